"""The cluster path with real machinery: ``cluster=submitit_local`` runs a sweep through
hydra-submitit-launcher's local executor, which pickles the jobs, runs them as processes, handles
SIGUSR2 and requeues exactly as on SLURM. One job of a 2-job sweep is preempted after its first
reconstruction unit; its requeued process resumes and must end with the result of the job that was
never interrupted. The second job's checkpoint is then evaluated as a 2-shard sweep and merged."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from recon_cli import RECON_RUN, ROOT, checkpoint_tensors, comparable_metrics, env, predictions, tensor_differences

pytestmark = [
    pytest.mark.slow,
    # Not under pytest-xdist (the README's test command is serial): in the 2-worker suite on a 2-core host an
    # xdist worker was seen to exit silently ("node down: Not properly terminated"), also with this file
    # skipped; the cause was not found.
    pytest.mark.skipif(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1",
                       reason="submitit sweeps run only without parallel workers: pytest tests/test_cluster_submitit.py"),
]

STATE_FILE = "recon_state.pt"
# 30 iterations per unit: long enough that the signal lands before the last unit ends
SWEEP = [o for o in RECON_RUN if not o.startswith(("seed=", "ptq.recon.iters="))] + ["ptq.recon.iters=30"]


def _preempt_after_first_unit(run_dir, sweep: subprocess.Popen) -> None:
    """SIGUSR2 (SLURM's preemption / time-limit signal) to the job process once a unit is checkpointed."""
    deadline = time.monotonic() + 300
    while not (run_dir / STATE_FILE).is_file():
        assert sweep.poll() is None, f"sweep ended before the first unit:\n{sweep.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no reconstruction checkpoint within 300 s"
        time.sleep(0.01)
    pid = json.loads((run_dir / "status.json").read_text())["pid"]
    # Signal only a process of this sweep: SIGUSR2 ends any process without a handler for it.
    assert _descends_from(pid, sweep.pid), f"status.json names pid {pid}, which is not a process of this sweep"
    os.kill(pid, signal.SIGUSR2)


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (parent links read from /proc)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent pid
    return False


def _submitit_logs(sweep_dir) -> str:
    return "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.*"))


def test_preempted_job_is_requeued_and_resumes_then_shards_merge(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # two identical jobs: job 0 is preempted, job 1 is the uninterrupted reference
    command = [sys.executable, "-m", "saq.ptq", "-m", "cluster=submitit_local", *SWEEP, "seed=0,0",
               f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _preempt_after_first_unit(sweep_dir / "0", sweep)
        out, err = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert "2/2 jobs completed" in out

    preempted, reference = sweep_dir / "0", sweep_dir / "1"
    logs = _submitit_logs(sweep_dir)
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs
    status = json.loads((preempted / "status.json").read_text())
    assert status["state"] == "completed"
    ptq_log = (preempted / "ptq.log").read_text()
    assert "resuming reconstruction after" in ptq_log, "the requeued job started over instead of resuming"
    # resumed, not retrained: every unit's end is logged once
    trained = [k.split("/")[1] for line in (preempted / "log.jsonl").read_text().splitlines()
               for k in json.loads(line) if k.startswith("recon/") and k.endswith("/time_s")]
    assert trained and len(trained) == len(set(trained))

    assert comparable_metrics(preempted) == comparable_metrics(reference)
    assert predictions(preempted) == predictions(reference)
    assert tensor_differences(checkpoint_tensors(preempted / "quantized.pt"),
                              checkpoint_tensors(reference / "quantized.pt")) == []

    # the reference's checkpoint, evaluated as a 2-job sweep of shards, merged
    shard_dir = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "saq.eval", "-m", "cluster=submitit_local",
                           f"ckpt_path={reference / 'quantized.pt'}", "logger=none", "runtime.progress=false",
                           "eval.num_shards=2", "eval.shard=0,1", f"hydra.sweep.dir={shard_dir}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "saq.eval.merge", str(merged), str(shard_dir / "0"),
                           str(shard_dir / "1")], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = json.loads((reference / "metrics.json").read_text())["quantized"]
    sharded = json.loads((merged / "metrics.json").read_text())["quantized"]
    for key in ("mask_AP", "mask_AP50", "mask_AP75", "mIoU", "fidelity_mIoU"):
        assert sharded[key] == whole[key], key



def test_a_failed_job_under_submitit_costs_no_other_job(tmp_path):
    """The job refused (no such device) records its failure; the other job still runs; the sweep lists
    the failure and exits non-zero."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "saq.ptq", "-m", "cluster=submitit_local", "debug=fast", "ptq=fp",
                           "data=skimage", "data.photos=[coffee,camera]", "prompts=auto", "prompts.pred_iou_thresh=-100",
                           "prompts.stability_thresh=0", "prompts.points_per_side=2", "runtime.progress=false",
                           "runtime.device=cuda:99,cpu", f"paths.cache_dir={tmp_path / 'cache'}",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "1 of 2 jobs failed" in proc.stderr, proc.stderr[-3000:]
    assert "1/2 jobs completed" in proc.stdout
    assert json.loads((sweep_dir / "1" / "status.json").read_text())["state"] == "completed"
    failed = json.loads((sweep_dir / "0" / "status.json").read_text())
    assert failed["state"] == "failed" and "cuda:99" in failed["error"]
    assert "cuda:99" in (sweep_dir / "summary.md").read_text()
