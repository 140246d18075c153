"""Per-channel input scales for depthwise convolutions (``ptq.depthwise_input_channels``).

A depthwise convolution never mixes channels: output channel c reads only input channel c. One input
scale per channel therefore costs an integer runtime nothing (it folds into that channel's requantization
multiplier, next to the per-channel weight scale), while it lets every channel keep its own 4-bit grid.
It matters where a depthwise conv reads a stream with very different channel ranges: TinyViT applies its
`local_conv` to the residual stream itself, between attention and MLP, so its input quantizer would
otherwise put every channel of the stream on one grid.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from torch import nn

from saq.nn.quantize import QuantRule


def depthwise_convs(model: nn.Module, part: str = "image_encoder") -> list[str]:
    """Names of the nn.Conv2d under ``part`` whose every output channel reads one input channel."""
    names = []
    for name, module in model.get_submodule(part).named_modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels \
                and module.out_channels % module.groups == 0:
            names.append(f"{part}.{name}")
    return names


def with_depthwise_channel_rules(model: nn.Module, rules: list[QuantRule]) -> list[QuantRule]:
    """``rules`` with one exact-name rule in front for every depthwise conv whose rule quantizes its input
    per tensor with a uniform quantizer: the same specs, the input's scales per channel (axis 1). Inputs
    with another quantizer (a post-GELU level table) keep it."""
    added = []
    for name in depthwise_convs(model):
        rule = next((r for r in rules if fnmatch.fnmatchcase(name, r.pattern)), None)
        if rule is None or rule.act is None or rule.act.quantizer != "uniform" or rule.act.granularity != "tensor":
            continue
        added.append(QuantRule(pattern=name, weight=rule.weight,
                               act=dataclasses.replace(rule.act, granularity="channel1"), softmax=rule.softmax))
    return added + rules
