"""runtime.device=cuda on a machine without CUDA stops at once with one line, no traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def run_cli(module: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("module, extra", [("saq.ptq", ["debug=fast"]), ("saq.eval", ["ckpt_path=missing.pt"])])
def test_cuda_without_cuda_is_one_config_error(module, extra, tmp_path):
    result = run_cli(module, *extra, "runtime.device=cuda", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error: runtime.device=cuda: "), result.stderr
    # no run was started; the dir Hydra made says why it holds no results
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("config error: runtime.device=cuda")
