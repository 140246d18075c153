"""``quantize_(model, rules)``: swap modules for quantized ones by ordered module-name rules.

A rule matches module names with a glob pattern; the first matching rule decides. A rule without a
weight and an activation spec keeps the module in floating point. The result is a *layout*
(module name -> kind and specs) that is stored in checkpoints and re-applied on load, so a saved model
never depends on the rules that produced it.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from saq.nn.attention import QuantTwoWayAttention, QuantViTAttention
from saq.nn.modules import QuantConv2d, QuantizedModule, QuantLinear
from saq.quant.quantizer import QuantSpec


@dataclass(frozen=True)
class QuantRule:
    """Modules whose name matches ``pattern`` get these specs (None = keep that part FP)."""

    pattern: str
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    softmax: QuantSpec | None = None  # post-softmax point of attentions; None = same as ``act``

    @property
    def keeps_fp(self) -> bool:
        return self.weight is None and self.act is None


def quantized_classes() -> dict[str, type[QuantizedModule]]:
    """Kind name -> quantized class, for every float class this installation can swap."""
    kinds: dict[str, type[QuantizedModule]] = {
        "linear": QuantLinear,
        "conv2d": QuantConv2d,
        "vit_attention": QuantViTAttention,
        "two_way_attention": QuantTwoWayAttention,
    }
    # A TinyViT attention exists only once mobile_sam is imported; importing it for other models costs time.
    if "mobile_sam" in sys.modules:
        from saq.nn.tinyvit_attention import QuantTinyViTAttention

        kinds["tinyvit_attention"] = QuantTinyViTAttention
    return kinds


def _kind_of(module: nn.Module) -> str | None:
    # Exact type match: QuantLinear is itself an nn.Linear and must not be swapped twice.
    for kind, cls in quantized_classes().items():
        if type(module) is cls.float_cls:
            return kind
    return None


def _match(rules: Iterable[QuantRule], name: str) -> QuantRule | None:
    for rule in rules:
        if fnmatch.fnmatchcase(name, rule.pattern):
            return rule
    return None


def plan_layout(model: nn.Module, rules: list[QuantRule]) -> dict[str, dict[str, Any]]:
    """Which module becomes which quantized kind with which specs (nothing is changed)."""
    layout: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        kind = _kind_of(module)
        if kind is None:
            continue
        rule = _match(rules, name)
        if rule is None or rule.keeps_fp:
            continue
        weight, act, softmax = rule.weight, rule.act, None
        if kind.endswith("attention"):
            if act is None:  # attention only has activation quantization points
                continue
            weight, softmax = None, rule.softmax
        layout[name] = {
            "kind": kind,
            "weight": weight.to_dict() if weight is not None else None,
            "act": act.to_dict() if act is not None else None,
        }
        if softmax is not None:
            layout[name]["softmax"] = softmax.to_dict()
    return layout


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_layout_(model: nn.Module, layout: dict[str, dict[str, Any]]) -> nn.Module:
    """Swap the modules named in ``layout`` in place (parents before children)."""
    classes = quantized_classes()
    for name in sorted(layout, key=lambda n: n.count(".")):
        entry = layout[name]
        if entry["kind"] not in classes:
            raise ValueError(f"layout entry {name!r} has unknown kind {entry['kind']!r} (is mobile_sam installed?)")
        cls = classes[entry["kind"]]
        module = model.get_submodule(name)
        if type(module) is not cls.float_cls:
            raise TypeError(f"module {name!r} is {type(module).__name__}, layout expects {cls.float_cls.__name__}")
        weight = QuantSpec.from_dict(entry["weight"]) if entry["weight"] else None
        act = QuantSpec.from_dict(entry["act"]) if entry["act"] else None
        if entry.get("softmax"):
            new = cls.from_float(module, weight, act, softmax=QuantSpec.from_dict(entry["softmax"]))
        else:
            new = cls.from_float(module, weight, act)
        for quantizer in new.quantizers().values():
            quantizer.train(module.training)  # new quantizers follow the module's train/eval mode
        _set_submodule(model, name, new)
    return model


def quantize_(model: nn.Module, rules: list[QuantRule]) -> dict[str, dict[str, Any]]:
    """Quantize ``model`` in place by rules; returns the layout that was applied."""
    layout = plan_layout(model, rules)
    apply_layout_(model, layout)
    return layout


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_`: every quantized module goes back to its float class (same Parameters)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule)]
    for name in sorted(names, key=lambda n: -n.count(".")):
        _set_submodule(model, name, model.get_submodule(name).to_float())
    return model


@torch.no_grad()
def harden_weights_(model: nn.Module) -> int:
    """Replace every quantized weight by its grid value, so stored weights are the deployed ones.

    Learned (AdaRound) rounding is made hard here and switched off.
    """
    count = 0
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if isinstance(module, QuantizedModule) and quantizer is not None and quantizer.is_calibrated:
            module.weight.copy_(quantizer.harden(module.weight))
            count += 1
    return count
