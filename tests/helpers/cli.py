"""Run the project's entry points as a user does: subprocesses from the repository root."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(module, *overrides, check=True, wandb_mode="disabled", env=None, timeout=900):
    """``python -m module overrides`` from the repository root; ``env`` adds to (and overrides) the
    environment; raises with the output's tail when ``check`` and the run fails."""
    env = {**os.environ, "WANDB_MODE": wandb_mode, "HYDRA_FULL_ERROR": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *overrides, "runtime.progress=false"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {overrides} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read(path):
    return json.loads(Path(path).read_text())
