#!/usr/bin/env bash
# Everything a GPU session should measure, in one command (about 9 minutes on one H200):
#   bash experiments/gpu_check.sh            on the device machine, after `source .devassets/setup.sh`
#   bash experiments/gpu_check.sh --tiny     the same steps on the CPU with the tiny model (a test runs this)
#   bash experiments/gpu_check.sh --which-python   print the interpreter the steps would use, and exit
# The interpreter: $PYTHON if set, else the active `python` (or `python3`) if it imports saq, else the
# project's .venv/bin/python. The script exits 1 when any step failed (steps.tsv says which).
# Steps, each under its own time limit; a failing step is recorded and the next one still runs:
#   1. python -m pytest -m gpu                         (skipped with --tiny: there is no CUDA)
#   2. python -m saq.bench recipe for vit_t (real weights) and vit_b (model.checkpoint=random: cost only)
#   3. vit_t_coco-style W4A4 saq_sam and ptq4sam_l with the recipes' own iteration counts (ptq4sam_l's
#      20000 per unit is capped by PTQ4SAM_L_ITERS, default 2000, so that both fit the session), then
#      python -m saq.results compare of the two
# Results go under $OUT (default outputs/gpu_check): steps.tsv (step, exit code, seconds), one log per
# step, bench dirs, run dirs with metrics.json, compare.md. Nothing here needs network access.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1

find_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return 0; fi
  local candidate
  for candidate in python python3; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch, hydra, saq" 2> /dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, hydra, saq" 2> /dev/null; then
    echo "$PWD/.venv/bin/python"; return 0
  fi
  return 1
}
if ! PY=$(find_python); then
  echo "gpu_check: no Python that imports saq (tried \$PYTHON, python, python3, .venv/bin/python);" \
    "install the project (pip install -e .) or set PYTHON=/path/to/python" >&2
  exit 2
fi
if [ "${1:-}" = "--which-python" ]; then echo "$PY"; exit 0; fi
mkdir -p "$OUT"
printf "step\texit_code\tseconds\n" > "$OUT/steps.tsv"
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  printf "%s\t%s\t%s\n" "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "   exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
}

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  BENCH_T=(model=tiny debug=fast data.max_images=2)
  BENCH_B=(model=tiny model.checkpoint=random debug=fast data.max_images=2)
  RUN=(debug=fast quant=w4a8 data.max_images=2)
  SAQ_ITERS=(ptq.recon.iters=2 ptq.recon.final_attn_iters=2 ptq.pcc.percentiles=[0.99,1.0] ptq.pcc.passes=1)
  PTQ4SAM_L_ITERS=2
  LIMIT=300
else
  DEVICE=cuda
  BENCH_T=(model=vit_t experiment=vit_t_coco data.max_images=16)
  BENCH_B=(model=vit_b model.checkpoint=random data=coco_subset_val prompts=gt data.max_images=8)
  RUN=(experiment=vit_t_coco quant=w4a4 eval.num_workers=4)  # JPEG decoding off the critical path
  SAQ_ITERS=()
  PTQ4SAM_L_ITERS=${PTQ4SAM_L_ITERS:-2000}
  LIMIT=240
  step pytest_gpu 180 "$PY" -m pytest -q -m gpu
fi

COMMON=(runtime.device=$DEVICE runtime.progress=false logger=none)
BENCH_PCC=()
[ "$TINY" = 1 ] && BENCH_PCC=(ptq.pcc.percentiles=[0.99,1.0] ptq.pcc.passes=1)
step bench_small_model "$LIMIT" "$PY" -m saq.bench recipe "${BENCH_T[@]}" quant=w4a4 ptq=saq_sam ptq.recon.iters=3 \
  "${BENCH_PCC[@]}" "${COMMON[@]}" out="$OUT/bench_vit_t"
step bench_large_model "$LIMIT" "$PY" -m saq.bench recipe "${BENCH_B[@]}" quant=w4a4 ptq=saq_sam ptq.recon.iters=3 \
  "${BENCH_PCC[@]}" "${COMMON[@]}" out="$OUT/bench_vit_b"
step run_saq_sam "$LIMIT" "$PY" -m saq.ptq "${RUN[@]}" ptq=saq_sam "${SAQ_ITERS[@]}" seed=0 "${COMMON[@]}" \
  hydra.run.dir="$OUT/runs/saq_sam"
step run_ptq4sam_l "$LIMIT" "$PY" -m saq.ptq "${RUN[@]}" ptq=ptq4sam_l ptq.recon.iters="$PTQ4SAM_L_ITERS" seed=0 \
  "${COMMON[@]}" hydra.run.dir="$OUT/runs/ptq4sam_l"
step compare 60 "$PY" -m saq.results compare "$OUT/runs" --baseline ptq4sam_l --out "$OUT/compare"

echo "== steps (exit code 0 = passed):"
cat "$OUT/steps.tsv"
if [ "$FAILED" -gt 0 ]; then
  echo "gpu_check: $FAILED step(s) failed; their logs are in $OUT" >&2
  exit 1
fi
