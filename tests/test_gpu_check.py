"""experiments/gpu_check.sh --tiny: every step of the GPU session's script runs on the CPU."""

import csv
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OUT": str(out), "WANDB_MODE": "disabled", "PYTHON": os.environ.get("PYTHON", "python")}
    import sys

    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", "experiments/gpu_check.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "steps.tsv") as f:
        steps = {row["step"]: int(row["exit_code"]) for row in csv.DictReader(f, delimiter="\t")}
    assert steps == {"bench_small_model": 0, "bench_large_model": 0, "run_saq_sam": 0, "run_ptq4sam_l": 0,
                     "compare": 0}, {k: (out / f"{k}.log").read_text()[-2000:] for k, v in steps.items() if v}
    assert (out / "bench_vit_t" / "bench.json").is_file() and (out / "bench_vit_b" / "bench.json").is_file()
    assert (out / "runs" / "saq_sam" / "metrics.json").is_file() and (out / "compare.md").is_file()
