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

from saq.models.build import build_architecture
from saq.nn.quantize import apply_layout_
from saq.quant.quantizer import QuantMode, set_quant_mode

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
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind
    return path


def read_quantized(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"quantized checkpoint not found: {path}. Pass ckpt_path=<run dir>/quantized.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saq quantized checkpoint (expected format {FORMAT!r}); "
                         "FP SAM checkpoints go to model.checkpoint instead")
    return payload


def load_quantized(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized model (QUANTIZE mode, eval mode, CPU) and the checkpoint's payload."""
    payload = read_quantized(path)
    model = build_architecture(payload["model_name"], seed=int(payload["config"]["model"].get("init_seed", 0)))
    apply_layout_(model, payload["layout"])
    model.load_state_dict(payload["state_dict"], strict=True)
    set_quant_mode(model, QuantMode.QUANTIZE)
    return model.eval(), payload  # eval() after loading: TinyViT caches its attention biases there
