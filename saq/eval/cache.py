"""Cache of FP evaluations: every recipe of a sweep compares against the same FP predictions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from saq.eval.evaluate import EvalResult


CACHE_FORMAT = 2  # bump when EvalResult records change shape, so older cache files are not reused


def fp_cache_key(model_cfg: dict[str, Any], data_cfg: Any, prompts_cfg: Any, image_ids: list[int],
                 device: str) -> str:
    checkpoint = model_cfg.get("checkpoint")
    fingerprint = None
    if checkpoint and Path(checkpoint).expanduser().is_file():
        stat = Path(checkpoint).expanduser().stat()
        fingerprint = [stat.st_size, int(stat.st_mtime)]
    blob = json.dumps({"model": model_cfg, "weights": fingerprint, "data": data_cfg, "prompts": prompts_cfg,
                       "images": image_ids, "device": device, "torch": torch.__version__, "format": CACHE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_evaluation(cache_dir: Path | None, key: str, compute: Callable[[], EvalResult]) -> tuple[EvalResult, bool]:
    """Load the result stored under ``key`` or compute and store it; returns (result, was_cached)."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir).expanduser() / f"{key}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return EvalResult(data["records"], data["metrics"], data["timing"]), True
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"records": result.records, "metrics": result.metrics, "timing": result.timing}))
    tmp.replace(path)
    return result, False
