"""Capture the inputs of modules during real forward passes, with forward-pre hooks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from saq.data.calibration import CalibrationItem
from saq.ptq.image_source import ImageSource
from saq.models.predictor import EncodedImage, decode_boxes, decoder_batches, encode_image


ENCODER_PREFIX = "image_encoder."
DECODER_PREFIX = "mask_decoder."


class _EntriesCaptured(Exception):
    """Ends a pass early: every entry has been captured for the current image (encoder) or decoder call."""


def share_repeated_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one stored row when every row along dim 0 is the same (a stride-0 view of it), else ``t``.
    The mask decoder repeats the image's positional encoding, and at its first layer the image embedding,
    once per prompt: kept per prompt, they would be half of a decoder unit's inputs."""
    if t.dim() < 2 or t.shape[0] < 2 or not torch.equal(t, t[:1].expand_as(t)):
        return t
    return t[:1].clone().expand(t.shape)


def _detach(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        v = value.detach().to(device)
        return share_repeated_rows(v.to(dtype) if dtype is not None and v.is_floating_point() else v)
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v, device, dtype) for k, v in value.items()}
    return value


def _detached_call(args: tuple, kwargs: dict, device: torch.device, dtype: torch.dtype | None) -> tuple:
    """One call's (args, kwargs) as a capture stores it: detached, on ``device``, in ``dtype``."""
    return _detach(args, device, dtype), _detach(kwargs, device, dtype)


@dataclass
class KeptInputs:
    """The inputs of ``entries`` kept from FP encoder passes that another stage runs anyway (calibration's
    observers see an FP forward of every calibration image), in the order of ``paths``, until reconstruction
    takes them: its FP capture is then not a second encoder pass over the calibration set."""

    entries: list[str]
    device: torch.device
    dtype: torch.dtype | None = None
    captured: dict[str, list[tuple]] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)

    @contextlib.contextmanager
    def recording(self, model: nn.Module, path: Path) -> Iterator[None]:
        """Keep what ``entries`` receive during one image's pass; the pass must run the model as FP (every
        quantizer OFF or OBSERVE). An interrupted pass keeps nothing of that image."""
        calls: dict[str, list[tuple]] = {name: [] for name in self.entries}

        def hook_for(name):
            def hook(module, args, kwargs):
                calls[name].append(_detached_call(args, kwargs, self.device, self.dtype))
            return hook

        handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True)
                   for name in self.entries]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if any(len(c) != 1 for c in calls.values()):  # encoder entries run once per image
            raise RuntimeError(f"kept inputs: each encoder entry should run once per image, got "
                               f"{ {n: len(c) for n, c in calls.items()} }")
        for name, c in calls.items():
            self.captured.setdefault(name, []).extend(c)
        self.paths.append(Path(path))

    def take(self, entries: list[str], paths: list[Path]) -> dict[str, list[tuple]] | None:
        """The kept inputs of ``entries`` for ``paths`` (in that order), handed over once; None when they
        were not all kept for exactly these images (the caller captures them itself)."""
        if not set(entries) <= set(self.captured) or [Path(p) for p in paths] != self.paths:
            return None
        taken = {name: self.captured[name] for name in entries}
        self.captured, self.paths = {}, []
        return taken


def run_items(model: nn.Module, items: list[CalibrationItem], encoded: list[EncodedImage] | None = None,
              images: ImageSource | None = None) -> None:
    """The SAM forward for each item: encoder (unless ``encoded`` holds its output) + decoder with its boxes."""
    images = images or ImageSource(model)
    for i, item in enumerate(items):
        image = encoded[i] if encoded is not None else encode_image(model, images.image(item.image.path))
        decode_boxes(model, image, torch.tensor([p.box_xyxy for p in item.prompts]), return_masks=False)


@torch.no_grad()
def encode_items(model: nn.Module, items: list[CalibrationItem], images: ImageSource | None = None
                 ) -> list[EncodedImage]:
    """The model's image embeddings in its current quantizer modes."""
    images = images or ImageSource(model)
    return [encode_image(model, images.image(item.image.path)) for item in items]


@torch.no_grad()
def capture_inputs(model: nn.Module, entries: list[str], items: list[CalibrationItem],
                   cache_device: torch.device, cache_dtype: torch.dtype | None = None,
                   encoded: list[EncodedImage] | None = None, images: ImageSource | None = None
                   ) -> dict[str, list[tuple]]:
    """{entry: [(args, kwargs) per call]} for every call of each entry module while running ``items``
    (decoder only when ``encoded`` gives the image embeddings)."""
    if not entries:
        return {}  # nothing to capture: no forward pass
    captured: dict[str, list[tuple]] = {name: [] for name in entries}
    handles = []
    # Entries inside the image encoder are each called once per image, entries inside the mask decoder once
    # per decoder call: their inputs are known as soon as the last of them is reached, and the rest of that
    # pass (later layers, the decoder's heads, for encoder entries the decoder) need not run.
    encoder_only = encoded is None and all(name.startswith(ENCODER_PREFIX) for name in entries)
    decoder_only = encoded is not None and all(name.startswith(DECODER_PREFIX) for name in entries)
    passes_done = [0]

    def hook_for(name):
        def hook(module, args, kwargs):
            captured[name].append(_detached_call(args, kwargs, cache_device, cache_dtype))
            if (encoder_only or decoder_only) and all(len(calls) > passes_done[0] for calls in captured.values()):
                raise _EntriesCaptured
        return hook

    def stopping_early(run) -> None:
        try:
            run()
        except _EntriesCaptured:
            pass
        passes_done[0] += 1

    try:
        for name in entries:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True))
        images = images or ImageSource(model)
        if encoder_only:
            for item in items:
                stopping_early(lambda: encode_image(model, images.image(item.image.path)))
        elif decoder_only:
            for image, item in zip(encoded, items):
                for inputs in decoder_batches(model, image, torch.tensor([p.box_xyxy for p in item.prompts])):
                    stopping_early(lambda: model.mask_decoder(**inputs))
        else:
            run_items(model, items, encoded, images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move a cached (args, kwargs) structure back to the compute device; ``dtype`` None: tensors cached
    in 16 bits come back as float32, float32/float64 ones as they were captured (the model's dtype)."""
    if isinstance(value, torch.Tensor):
        v = value.to(device)
        if not v.is_floating_point():
            return v
        return v.to(dtype if dtype is not None else torch.promote_types(v.dtype, torch.float32))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value
