"""Cache of weight ranges: every run of a sweep that quantizes the same weights with the same observer
gets the same ranges, so the search runs once per weight tensor, not once per run.

A weight's range depends only on the tensor, the quantizer's spec (bits, symmetric, granularity,
observer and its settings) and where the search ran (the device's reductions add in their own order),
never on calibration images or seeds. On the Lp search with zero points
(the MSE observer of the reconstruction recipes: 100 steps x every zero point per channel, p = 2.4) it
is the largest part of calibrating vit_t on the CPU. The key is the tensor's bytes and the spec, so a
bimodal fold that flips rows of q/k, another checkpoint or another bit width each get their own entry.
Entries are written atomically; one that cannot be read back is reported and recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from saq.utils.run_files import atomic_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when an observer's search changes, so older ranges are not reused


def weight_range_key(weight: torch.Tensor, spec) -> str:
    """sha1 of the weight's bytes (as float32), its shape, dtype and device type, the quantizer's spec and
    the torch version."""
    digest = hashlib.sha1()
    values = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest.update(values.numpy().tobytes())
    digest.update(json.dumps({"shape": list(values.shape), "dtype": str(weight.dtype), "device": weight.device.type,
                              "spec": dataclasses.asdict(spec), "torch": torch.__version__, "format": CACHE_FORMAT},
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


class WeightRangeCache:
    """(min, max) of each weight quantizer's range, one small file per key under ``cache_dir``."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir).expanduser()
        self.hits = 0
        self.misses = 0
        self.unwritable = False  # warned once; later writes are not tried

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def get(self, key: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored (min, max), each of ``shape`` (the quantizer's parameter shape), or None."""
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            low, high = entry["min"], entry["max"]
            if tuple(low.shape) != tuple(shape) or tuple(high.shape) != tuple(shape):
                raise ValueError(f"shape {tuple(low.shape)}, expected {tuple(shape)}")
            if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
                raise ValueError("non-finite range")
        except Exception as exc:  # a truncated or edited file: the search runs again
            log.warning("weight range cache entry %s is unreadable (%s: %s); recomputing it", path,
                        type(exc).__name__, str(exc)[:200])
            self.misses += 1
            return None
        self.hits += 1
        return low, high

    def put(self, key: str, low: torch.Tensor, high: torch.Tensor) -> None:
        """Store a searched range; a cache that cannot be written (read-only, disk full) is reported and
        calibration goes on without it (one warning per run, not one per tensor)."""
        if self.unwritable:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(self._path(key)) as f:
                torch.save({"min": low.detach().cpu(), "max": high.detach().cpu()}, f)
        except OSError as exc:
            self.unwritable = True
            log.warning("weight range cache %s is not writable (%s); ranges are not cached in this run. Set "
                        "calib.weight_range_cache=null to turn it off", self.dir, exc)
