"""Run the project's entry points as a user does: subprocesses from the repository root."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(module, *overrides, check=True, wandb_mode="disabled"):
    env = {**os.environ, "WANDB_MODE": wandb_mode, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *overrides, "runtime.progress=false"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {overrides} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read(path):
    return json.loads(Path(path).read_text())
