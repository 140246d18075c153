"""A small reconstruction run through the real CLI (``python -m saq.ptq``), and what two such runs
must share to count as the same result. Used by the determinism and resume tests."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# QDrop at W4A4 on two scikit-image photos (no shared assets), prompts from the FP model's own masks:
# every recipe stage (calibration, reconstruction of 6 encoder + decoder units with random QDrop
# masks and sampled batches, hardening, evaluation) runs, and quantized AP is below 100. One thread:
# the tiny model gains nothing from more, and on a shared 2-core machine they make a run 3x slower.
RECON_RUN = ("debug=fast", "data=skimage", "data.photos=[coffee,camera]", "prompts=auto",
             "prompts.pred_iou_thresh=-100", "prompts.stability_thresh=0", "prompts.points_per_side=2",
             "quant=w4a4", "ptq=qdrop", "ptq.recon.iters=5", "eval.cache_fp=false", "eval.side_by_side=0",
             "logger=none", "seed=0", "runtime.progress=false", "runtime.num_threads=1")
VOLATILE = frozenset({"wall_time_s", "timing", "time_s", "setup_s", "ms_per_iter", "seconds",
                       "peak_memory_mb", "checkpoint",
                       "image_source"})  # clocks, memory, paths, work done by this process


def ptq_command(run_dir: Path, cache_dir: Path) -> list[str]:
    """One run in ``run_dir`` with its own cache (its own photos, auto prompts): nothing shared."""
    return [sys.executable, "-m", "saq.ptq", *RECON_RUN, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}


def run_ptq(run_dir: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(ptq_command(run_dir, cache_dir), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"saq.ptq failed in {run_dir}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def comparable_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json without wall times, memory and paths: what a rerun must reproduce exactly."""
    return _without_volatile(json.loads((run_dir / "metrics.json").read_text()))


def predictions(run_dir: Path) -> dict[str, Any]:
    """Per-prompt boxes, scores, IoUs and masks of the FP and quantized evaluations."""
    with gzip.open(run_dir / "predictions.json.gz", "rt") as f:
        return json.load(f)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in quantized.pt (state dict and anything else), keyed by its place in the payload."""
    found: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")

    walk(torch.load(path, map_location="cpu", weights_only=True), "")
    return found


def tensor_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys present in one only, and tensors that are not bit-identical (with their largest gap)."""
    diffs = [f"{k}: only in one checkpoint" for k in sorted(a.keys() ^ b.keys())]
    for k in sorted(a.keys() & b.keys()):
        if not torch.equal(a[k], b[k]):
            gap = (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else "shape"
            diffs.append(f"{k}: differs (max gap {gap})")
    return diffs
