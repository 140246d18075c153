#!/usr/bin/env bash
# The `experiment=vit_t_coco` tables of results/vit_t_coco/README.md, end to end on the CPU: every
# recipe row over seeds 0-2, then the small files into results/ and the tables rebuilt from them.
# Hours on a 2-core machine; a killed sweep resumes job by job with `resume=<job dir>`.
#   bash experiments/vit_t_coco.sh            # run
#   DRY_RUN=1 bash experiments/vit_t_coco.sh  # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "$*"; else "$@"; fi; }

OUT=outputs/vit_t_coco_tables
COMMON="experiment=vit_t_coco seed=0,1,2 runtime.num_threads=1 logger=none"
run $PY -m saq.ptq -m $COMMON quant=w6a6,w4a4 ptq=minmax,omse,ptq4sam_s,saq_star hydra.sweep.dir=$OUT/calibration
run $PY -m saq.ptq -m $COMMON quant=w6a6,w4a4 ptq=brecq,qdrop,ptq4sam_l,saq_base,saq_par,saq_pcc,saq_sam \
  ptq.recon.iters=20 hydra.sweep.dir=$OUT/recon20
run $PY -m saq.ptq -m $COMMON quant=w6a6,w4a4 ptq=saq_rc,saq_rc_gelu ptq.recon.iters=0 hydra.sweep.dir=$OUT/new0
run $PY -m saq.ptq -m $COMMON quant=w4a4 ptq=saq_rc,saq_rc_gelu ptq.recon.iters=20 hydra.sweep.dir=$OUT/new20
# saq_rc_gelu's ablations at 0 steps: without reparameterization, without compensation (saq_rc above: without tables)
run $PY -m saq.ptq -m $COMMON quant=w4a4 ptq=saq_rc_gelu ptq.recon.iters=0 "ptq.stages=[bimodal,calibrate,reconstruct,compensate]" \
  hydra.sweep.dir=$OUT/ablation_noreparam
run $PY -m saq.ptq -m $COMMON quant=w4a4 ptq=saq_rc_gelu ptq.recon.iters=0 "ptq.stages=[bimodal,reparam,calibrate,reconstruct]" \
  hydra.sweep.dir=$OUT/ablation_nocomp
run $PY -m saq.ptq -m $COMMON quant=w4a4 ptq=saq_base,saq_sam,ptq4sam_l,saq_rc_gelu ptq.recon.iters=100 runtime.compile=true \
  hydra.sweep.dir=$OUT/recon100
run $PY -m saq.results collect $OUT/calibration $OUT/recon20 $OUT/new0 $OUT/new20 $OUT/ablation_noreparam \
  $OUT/ablation_nocomp $OUT/recon100 --results results
run $PY -m saq.results compare results/vit_t_coco --baseline ptq4sam_l --baseline-iters 20
run $PY -m saq.results cost results/vit_t_coco
