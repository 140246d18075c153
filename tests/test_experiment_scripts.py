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


@pytest.mark.parametrize("script,count", [("vit_t_coco.sh", 5), ("paper_tables.sh", 3)])
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
