"""A CLI run SIGKILLed during reconstruction and started again with the same command ends with the same
metrics, predictions and quantized weights as a run that was never interrupted."""

import json
import signal
import subprocess
import time

import pytest
import torch

from recon_cli import (ROOT, checkpoint_tensors, comparable_metrics, env, predictions, ptq_command, run_ptq,
                       tensor_differences)

STATE_FILE = "recon_state.pt"


def _kill_after_first_unit(run_dir, cache_dir) -> None:
    """Start the run, wait for the first unit's checkpoint, SIGKILL it (no handler, no cleanup)."""
    proc = subprocess.Popen(ptq_command(run_dir, cache_dir), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / STATE_FILE).is_file():
            assert proc.poll() is None, f"run ended before its first unit:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no reconstruction checkpoint within 240 s"
            time.sleep(0.01)  # units take a fraction of a second: kill before the last one ends
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _run_log(run_dir) -> str:
    """The text of the run's Hydra log files."""
    return "".join(p.read_text() for p in run_dir.glob("*.log"))


def _recon_time_entries(run_dir) -> list[str]:
    """The units whose end was logged to log.jsonl, once per time the unit was trained."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [k.split("/")[1] for line in lines for k in line if k.startswith("recon/") and k.endswith("/time_s")]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_ptq(reference, tmp_path / "cache_reference")

    _kill_after_first_unit(resumed, tmp_path / "cache_resumed")
    state = torch.load(resumed / STATE_FILE, map_location="cpu", weights_only=True)
    units = len(state["unit_names"])
    assert 1 <= len(state["done"]) < units, "killed too late: nothing left to resume"
    assert not (resumed / "metrics.json").exists() and not (resumed / "quantized.pt").exists()
    killed_done = list(state["done"])

    proc = run_ptq(resumed, tmp_path / "cache_resumed")  # the same command, the same run dir
    # calibration was not run again: its ranges came with the reconstruction checkpoint
    assert "resuming after calibrate" in proc.stdout + proc.stderr + _run_log(resumed)
    assert json.loads((resumed / "status.json").read_text())["state"] == "completed"
    # it resumed: the units checkpointed before the kill were not trained again
    trained = _recon_time_entries(resumed)
    assert set(trained) == set(state["unit_names"]) and all(trained.count(u) == 1 for u in killed_done)

    a, b = comparable_metrics(reference), comparable_metrics(resumed)
    assert a["quantized"]["mask_AP"] < 100.0 and len(a["stages"]["reconstruct"]) == units
    assert (b["quantized"]["mask_AP"], b["quantized"]["mIoU"], b["quantized"]["fidelity_mIoU"]) == \
        (a["quantized"]["mask_AP"], a["quantized"]["mIoU"], a["quantized"]["fidelity_mIoU"])
    assert b == a
    assert predictions(resumed) == predictions(reference)
    assert tensor_differences(checkpoint_tensors(reference / "quantized.pt"),
                              checkpoint_tensors(resumed / "quantized.pt")) == []
