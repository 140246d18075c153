"""Finding, downloading, verifying and reading SAM checkpoints."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import torch

from saq.utils.errors import SaqUserError

log = logging.getLogger(__name__)


class CheckpointError(SaqUserError, RuntimeError):
    """A checkpoint is missing, unreadable or of the wrong kind."""


class CheckpointArchitectureError(CheckpointError):
    """The checkpoint belongs to a different SAM variant than the one requested."""


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download_checkpoint(url: str, cache_dir: Path, md5: str | None = None) -> Path:
    """Download ``url`` into ``cache_dir`` once (verified by md5) and return the file."""
    cache_dir = Path(cache_dir)
    target = cache_dir / Path(url).name
    if target.exists() and (md5 is None or md5sum(target) == md5):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # a partial file of this process's own: jobs of one sweep may download the same checkpoint at once
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    log.info("downloading %s -> %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not download {url} ({exc}). This machine may be offline: download the file elsewhere "
            f"and pass model.checkpoint=/path/to/{target.name}, or copy it to {target}"
        ) from exc
    if md5 is not None and (got := md5sum(partial)) != md5:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"{url} downloaded with md5 {got}, expected {md5}: the download is corrupt; retry")
    partial.replace(target)
    return target


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why torch could not load ``path``, in words (torch's own text suggests ``weights_only=False``,
    which would execute code from the file)."""
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return "the file is truncated or corrupt (an incomplete zip archive)"
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
        found = re.search(r"GLOBAL (\S+)", str(exc))
        return (f"it holds pickled Python objects ({found.group(1) if found else 'not only tensors'}), which saq "
                "never unpickles")
    if isinstance(exc, EOFError):
        return "the file ends early (truncated)"
    return "it is not a PyTorch checkpoint (unknown format)"


def load_torch_file(path: Path, what: str, fix: str) -> Any:
    """``torch.load`` of tensors only; any failure becomes a one-line CheckpointError naming the file,
    the reason and ``fix``."""
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file. {fix}")
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"cannot read {what} {path}: {unreadable_reason(path, exc)}. {fix}") from exc


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a SAM/MobileSAM checkpoint file (plain, or under 'model'/'state_dict')."""
    path = Path(path)
    obj = load_torch_file(path, "checkpoint", "Set model.checkpoint to a complete PyTorch state dict file "
                          "(.pt/.pth, e.g. torch.save(model.state_dict(), path)), downloaded again if it was cut off")
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors. Set model.checkpoint to a file "
                              "written by torch.save(model.state_dict(), path)")
    return obj


_VIT_BY_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def detect_architecture(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the SAM variant a state dict belongs to (vit_b/l/h, vit_t, or a description)."""
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "vit_t"
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return "not a SAM checkpoint (no image_encoder.* weights)"
    width = patch.shape[0]
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    if width in _VIT_BY_WIDTH and depth in (12, 24, 32):
        return _VIT_BY_WIDTH[width]
    return f"a SAM ViT with width {width} and depth {depth}"
