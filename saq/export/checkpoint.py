"""Quantized checkpoints: state dict + layout + resolved config + versions, no pickled modules.

Loading rebuilds the architecture from the stored model name, re-applies the stored layout and loads
the state dict strictly, so a checkpoint never depends on the rules or observers that produced it.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saq.models.build import MODEL_NAMES, build_architecture
from saq.models.checkpoints import CheckpointError, detect_architecture, load_torch_file
from saq.nn.quantize import apply_layout_
from saq.quant.quantizer import QuantMode, set_quant_mode
from saq.utils.run_files import atomic_file

FORMAT = "saq.quantized/1"


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("saq", "torch", "segment-anything", "mobilesam-mirror", "hydra-core", "lightning"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def save_quantized(path: str | Path, model: nn.Module, layout: dict[str, Any], config: dict[str, Any],
                   metrics: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_name": config["model"]["name"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "layout": layout,
        "config": config,
        "metrics": metrics or {},
        "versions": package_versions(),
    }
    with atomic_file(path) as f:  # never a half-written checkpoint, never a shared temporary file
        torch.save(payload, f)
    return path


_REWRITE = "write it again with python -m saq.ptq (or copy it again if it was cut off in transfer)"
_PAYLOAD_KEYS = ("model_name", "state_dict", "layout", "config")


def read_quantized(path: str | Path) -> dict[str, Any]:
    """The payload of a quantized checkpoint; CheckpointError (naming the file and the fix) when it is
    missing, truncated, not a saq checkpoint or internally inconsistent."""
    path = Path(path).expanduser()
    payload = load_torch_file(path, "quantized checkpoint",
                              f"Pass ckpt_path=<run dir>/quantized.pt of a completed run, or {_REWRITE}")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a saq quantized checkpoint (expected format {FORMAT!r}); "
                              "FP SAM checkpoints go to model.checkpoint instead")
    missing = [k for k in _PAYLOAD_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"quantized checkpoint {path} lacks {missing}; {_REWRITE}")
    name, config_name = payload["model_name"], payload["config"].get("model", {}).get("name")
    if name not in MODEL_NAMES or name != config_name:
        raise CheckpointError(f"quantized checkpoint {path} names model {name!r} but its config says "
                              f"{config_name!r} (valid: {', '.join(MODEL_NAMES)}): the file was edited; {_REWRITE}")
    return payload


def _rebuild(path: Path, payload: dict[str, Any]) -> nn.Module:
    """The stored architecture with the stored layout and weights, or a CheckpointError saying why not."""
    name = payload["model_name"]
    model = build_architecture(name, seed=int(payload["config"]["model"].get("init_seed", 0)))
    try:
        apply_layout_(model, payload["layout"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, ValueError, AttributeError, TypeError) as exc:
        holds = detect_architecture(payload["state_dict"])
        raise CheckpointError(f"quantized checkpoint {path}: its weights ({holds}) do not fit model {name!r} "
                              f"({type(exc).__name__}); the file was edited or is damaged; {_REWRITE}") from exc
    return model


def load_quantized(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model (QUANTIZE mode, eval mode, CPU) and the checkpoint's payload."""
    path = Path(path).expanduser()
    payload = read_quantized(path)
    model = _rebuild(path, payload)
    set_quant_mode(model, QuantMode.QUANTIZE)
    return model.eval(), payload  # eval() after loading: TinyViT caches its attention biases there
