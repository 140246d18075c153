"""Cache of FP evaluations: every recipe of a sweep compares against the same FP predictions.

Entries are written atomically (a temporary file of their own + os.replace), and an entry that cannot
be read back (truncated, edited, non-finite) is reported with its path and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch

from saq.eval.evaluate import EvalResult
from saq.models.finite import NonFiniteOutputError
from saq.utils.run_files import write_text_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when EvalResult records change shape, so older cache files are not reused


def _canonical(value: Any) -> Any:
    """The key's view of a config value: enums as their values, existing paths resolved, so that the
    same settings give the same key whether they came typed from the schema or as plain strings, and
    whichever relative route led to the file."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def file_digest(path: Path) -> str:
    """sha1 of a file's bytes, read in 8 MiB chunks (a SAM-H checkpoint is 2.5 GB)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fp_cache_key(model_cfg: dict[str, Any], data_cfg: Any, prompts_cfg: Any, image_ids: list[int],
                 device: str) -> str:
    checkpoint = model_cfg.get("checkpoint")
    fingerprint = None
    if checkpoint and Path(checkpoint).expanduser().is_file():
        # The weights' bytes, not their mtime: a copied or re-provisioned checkpoint keeps its entries.
        fingerprint = file_digest(Path(checkpoint).expanduser())
    blob = json.dumps(_canonical({"model": model_cfg, "weights": fingerprint, "data": data_cfg, "prompts": prompts_cfg,
                                  "images": image_ids, "device": device, "torch": torch.__version__,
                                  "format": CACHE_FORMAT}), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def non_finite_fields(result: EvalResult) -> list[str]:
    """Record fields that are NaN/inf (a model's outputs must be finite before they are cached or reported)."""
    bad = []
    for i, record in enumerate(result.records):
        for key in ("score", "iou_pred"):
            value = record.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                bad.append(f"records[{i}].{key}={value}")
    return bad


def check_finite(result: EvalResult, what: str) -> EvalResult:
    bad = non_finite_fields(result)
    if bad:
        raise NonFiniteOutputError(f"{what}: non-finite predictions ({', '.join(bad[:3])}); check the model's "
                                   "weights (model.checkpoint) and quantizer ranges")
    return result


def _read_entry(path: Path) -> EvalResult | None:
    """The cached result, or None (with a warning naming the file) when it is unreadable."""
    try:
        data = json.loads(path.read_text())
        result = EvalResult(data["records"], data["metrics"], data["timing"])
        check_finite(result, str(path))
        return result
    except (OSError, ValueError, KeyError, TypeError, NonFiniteOutputError) as exc:
        log.warning("FP cache entry %s is unreadable (%s: %s); recomputing it", path, type(exc).__name__,
                    str(exc)[:200])
        return None


def cached_evaluation(cache_dir: Path | None, key: str, compute: Callable[[], EvalResult]) -> tuple[EvalResult, bool]:
    """Load the result stored under ``key`` or compute and store it; returns (result, was_cached)."""
    if cache_dir is None:
        return check_finite(compute(), "FP evaluation"), False
    path = Path(cache_dir).expanduser() / f"{key}.json"
    if path.is_file():
        cached = _read_entry(path)
        if cached is not None:
            return cached, True
    result = check_finite(compute(), "FP evaluation")  # never cache a broken model's outputs
    try:
        write_text_atomic(path, json.dumps({"records": result.records, "metrics": result.metrics,
                                            "timing": result.timing}))
    except OSError as exc:  # read-only or full: the run goes on, the next one recomputes
        log.warning("FP cache %s cannot be written (%s); the FP evaluation is not cached", path.parent, exc)
    return result, False
