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


def _fake_pythons(bin_dir: Path) -> None:
    """`python` and `python3` that cannot import anything."""
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)


def test_gpu_check_exits_non_zero_when_its_steps_fail(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OUT": str(out), "PYTHON": "false"}  # every step's interpreter fails at once
    proc = subprocess.run(["bash", "experiments/gpu_check.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "step(s) failed" in proc.stderr
    with open(out / "steps.tsv") as f:
        codes = [int(row["exit_code"]) for row in csv.DictReader(f, delimiter="\t")]
    assert len(codes) == 5 and all(codes)


def test_gpu_check_finds_the_active_python_without_being_told(tmp_path):
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    proc = subprocess.run(["bash", "experiments/gpu_check.sh", "--which-python"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == Path(sys.executable).parent


def test_gpu_check_without_a_usable_python_names_the_fix(tmp_path):
    project = tmp_path / "project"
    (project / "experiments").mkdir(parents=True)
    (project / "experiments" / "gpu_check.sh").write_text((ROOT / "experiments" / "gpu_check.sh").read_text())
    _fake_pythons(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    proc = subprocess.run(["bash", "experiments/gpu_check.sh", "--which-python"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "set PYTHON=" in proc.stderr and "no Python that imports saq" in proc.stderr
