"""The inputs a GELU feeds, found by data flow, and the rules that give them their own quantizer.

Post-GELU activations are skewed (a bounded negative side, a dense cluster near 0, a sparse tail), so a
recipe may quantize them with a level table (``ptq.post_gelu_quantizer``, saq.quant.table_quantizer)
instead of the uniform grid. Which Linear / Conv2d reads a GELU's output is read off one forward of the
image encoder rather than written down per architecture: ViT MLPs (``mlp.lin2``), TinyViT's MLPs
(``mlp.fc2``), its MBConv and patch-merging convolutions, and the first conv of every block that follows
an MBConv's closing GELU are all found the same way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping

import torch
from torch import nn

from saq.nn.quantize import QuantRule
from saq.quant.quantizer import QuantSpec
from saq.utils.errors import SaqUserError


class NoPostGeluInputsError(SaqUserError, ValueError):
    """A recipe asks for a post-GELU quantizer on a model where no quantizable layer reads a GELU."""


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


@torch.no_grad()
def post_gelu_inputs(model: nn.Module, part: str = "image_encoder") -> list[str]:
    """Names of the nn.Linear / nn.Conv2d modules under ``part`` whose input is an nn.GELU's output, in
    forward order, from one forward of that part on a seeded random image of its input size."""
    encoder = model.get_submodule(part)
    size = getattr(encoder, "img_size", None)
    if size is None:
        raise ValueError(f"{part} has no img_size: cannot build an input to trace which layers read a GELU")
    gelu_outputs: list[torch.Tensor] = []
    found: list[str] = []

    def keep_output(_module, _args, out):
        gelu_outputs.append(out)

    def check_input(name):
        def hook(_module, args):
            if args and any(_same_tensor(args[0], out) for out in gelu_outputs):
                found.append(name)
        return hook

    handles = []
    for name, module in encoder.named_modules():
        full = f"{part}.{name}" if name else part
        if isinstance(module, nn.GELU):
            handles.append(module.register_forward_hook(keep_output))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_pre_hook(check_input(full)))
    parameter = next(encoder.parameters())
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(parameter)
    was_training = encoder.training
    try:
        encoder.eval()
        encoder(image)
    finally:
        encoder.train(was_training)
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(found))


def post_gelu_spec(act: QuantSpec, settings: Mapping[str, Any]) -> QuantSpec:
    """``act``'s bits with the post-GELU quantizer, observer and search settings (per tensor, unsigned)."""
    return dataclasses.replace(act, quantizer=str(settings.get("quantizer", "table")), symmetric=False,
                               granularity="tensor", observer=str(settings.get("observer", "hybrid_log_uniform")),
                               observer_kwargs=dict(settings.get("kwargs") or {}))


def with_post_gelu_rules(model: nn.Module, rules: list[QuantRule], settings: Mapping[str, Any]) -> list[QuantRule]:
    """``rules`` with one exact-name rule in front for every post-GELU layer whose own rule quantizes its
    input: the same weight spec, the post-GELU activation spec. Layers the rules keep FP stay FP."""
    added = []
    for name in post_gelu_inputs(model):
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None or rule.act is None:
            continue
        added.append(QuantRule(pattern=name, weight=rule.weight, act=post_gelu_spec(rule.act, settings),
                               softmax=rule.softmax))
    if not added:
        raise NoPostGeluInputsError("ptq.post_gelu_quantizer is set, but no quantized nn.Linear / nn.Conv2d of "
                                    "the image encoder reads an nn.GELU's output; set ptq.post_gelu_quantizer=null")
    return added + rules
