"""The table scripts of experiments/ print commands that compose (each sweep's first job, --cfg job)."""

import os
import re
import subprocess
import sys

import pytest

from helpers.cli import ROOT


def first_jobs(script: str) -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", f"experiments/{script}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    jobs = []
    for line in out.splitlines():
        words = line.split()
        if words[1:3] != ["-m", "saq.ptq"]:
            continue
        overrides = [w for w in words[3:] if w != "-m"]
        # a sweep's first job: the first value of every comma list (a {...} or [...] value is one value)
        jobs.append([o if "{" in o or "[" in o else re.sub(r"^([^=]+=)([^,]+),.*$", r"\1\2", o) for o in overrides])
    return jobs


@pytest.mark.parametrize("script,count", [("vit_t_coco.sh", 7), ("paper_tables.sh", 3)])
def test_table_scripts_compose(script, count):
    jobs = first_jobs(script)
    assert len(jobs) == count
    for overrides in jobs:
        proc = subprocess.run([sys.executable, "-m", "saq.ptq", *overrides, "--cfg", "job"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{overrides}\n{proc.stderr[-2000:]}"


def test_paper_tables_names_the_missing_paths():
    env = {k: v for k, v in os.environ.items() if k not in ("SAM_CKPT_DIR", "COCO_DIR", "DETECTIONS", "DRY_RUN")}
    proc = subprocess.run(["bash", "experiments/paper_tables.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "set SAM_CKPT_DIR" in proc.stderr


@pytest.mark.slow
def test_sensitivity_of_a_finished_run_starts_from_its_own_numbers(tmp_path):
    """--from-run studies the saved model: with every group on it scores what the run reported."""
    import json

    from helpers.cli import read, run

    run_dir = tmp_path / "run"
    run("saq.ptq", "debug=fast", "quant=w4a4", "ptq=ptq4sam_s", f"hydra.run.dir={run_dir}")
    out = tmp_path / "sensitivity.json"
    script = ["experiments/sensitivity.py", "--out", str(out), "--from-run", str(run_dir)]
    proc = subprocess.run([sys.executable, *script, "debug=fast", "quant=w4a4", "ptq=ptq4sam_s",
                           "runtime.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record, reported = json.loads(out.read_text()), read(run_dir / "metrics.json")["quantized"]
    everything = record["rows"]["all (protocol)"]
    assert everything["mIoU"] == reported["mIoU"] and everything["fidelity_mIoU"] == reported["fidelity_mIoU"]
    groups = set(record["groups"]) - {"other"}
    assert {r.removeprefix("all but ") for r in record["rows"] if r.startswith("all but ")} == groups
    assert not any(r.startswith("only ") for r in record["rows"])
    assert "enc_attn_w" not in groups and {"dec_qkv_out", "enc_fc2_in"} <= groups  # weights sit on their grid

    proc = subprocess.run([sys.executable, *script[:2], str(tmp_path / "other.json"), *script[3:], "debug=fast",
                           "quant=w8a8", "ptq=ptq4sam_s"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds quant=w4a4" in proc.stderr
