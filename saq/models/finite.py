"""NaN/inf detection: a model whose outputs are not finite yields empty masks and AP 0, which must
never be reported (or cached) as a result. On detection, one image is run again with forward hooks
to name the first module whose output was not finite."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

from saq.models.predictor import decode_boxes, encode_image
from saq.utils.errors import SaqUserError


class NonFiniteOutputError(SaqUserError, RuntimeError):
    """A model produced NaN or inf."""


def has_non_finite(value: Any) -> bool:
    """True if any floating tensor in ``value`` (tensor, tuple, list or dict of them) holds NaN/inf."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, (tuple, list)):
        return any(has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    return False


class FiniteWatch:
    """Flags a non-finite output of the image encoder or the mask decoder (cheap: two hooks)."""

    def __init__(self) -> None:
        self.tripped = False

    def hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not self.tripped and has_non_finite(output):
            self.tripped = True


@contextlib.contextmanager
def watch_finite(model: torch.nn.Module) -> Iterator[FiniteWatch]:
    watch = FiniteWatch()
    parts = [getattr(model, n) for n in ("image_encoder", "mask_decoder") if hasattr(model, n)] or [model]
    handles = [part.register_forward_hook(watch.hook) for part in parts]
    try:
        yield watch
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def first_non_finite_module(model: torch.nn.Module, image: np.ndarray, boxes: torch.Tensor | None = None) -> str | None:
    """``name (Type)`` of the first module, in execution order, whose output holds NaN/inf on ``image``
    (encoder, then the decoder on ``boxes``); None if every output is finite."""
    found: list[str] = []

    def make_hook(name: str):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not found and has_non_finite(output):
                found.append(f"{name} ({type(module).__name__})")
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in model.named_modules() if n]
    try:
        encoded = encode_image(model, image)
        if not found and boxes is not None and boxes.numel():
            decode_boxes(model, encoded, boxes)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def non_finite_error(model: torch.nn.Module, image: np.ndarray, image_path: Any, what: str,
                     boxes: torch.Tensor | None = None) -> NonFiniteOutputError:
    """The error to raise once a non-finite output was seen, naming the module that produced it."""
    module = first_non_finite_module(model, image, boxes)
    where = f"first non-finite output: module '{module}'" if module else "no single module could be named"
    return NonFiniteOutputError(f"{what}: the model produced NaN/inf on {image_path} ({where}); check its weights "
                                "(model.checkpoint) or, for a quantized model, the quantizer ranges")
