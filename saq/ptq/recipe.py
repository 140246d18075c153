"""Translate the ``quant`` and ``ptq`` config nodes into quantization rules."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from saq.nn.quantize import QuantRule
from saq.quant.quantizer import QuantSpec


def _spec(bits: int | None, base: Mapping[str, Any], observer: Mapping[str, Any]) -> QuantSpec | None:
    if bits is None:
        return None
    return QuantSpec(bits=int(bits), symmetric=bool(base.get("symmetric", False)),
                     granularity=str(base.get("granularity", "tensor")), observer=str(observer["name"]),
                     observer_kwargs=dict(observer.get("kwargs") or {}))


def rules_from_config(quant: Mapping[str, Any], ptq: Mapping[str, Any]) -> list[QuantRule]:
    """Ordered rules: each ``quant.rules`` entry is {pattern, w_bits?, a_bits?}; no bits = keep FP."""
    rules = []
    softmax_cfg = ptq.get("softmax_quantizer")  # e.g. {quantizer: log, observer: agq}
    for entry in quant["rules"]:
        act = _spec(entry.get("a_bits"), quant["act"], ptq["act_observer"])
        softmax = None
        if act is not None and softmax_cfg:
            observer = str(softmax_cfg.get("observer") or act.observer)
            kwargs = dict(softmax_cfg.get("kwargs") or {})
            if observer == "agq" and ptq.get("agq_max_maps") is not None:
                kwargs.setdefault("max_maps", int(ptq["agq_max_maps"]))
            softmax = QuantSpec(bits=act.bits, symmetric=False, granularity="tensor", observer=observer,
                                observer_kwargs=kwargs,
                                quantizer=str(softmax_cfg.get("quantizer", "uniform")))
        rules.append(QuantRule(
            pattern=str(entry["pattern"]),
            weight=_spec(entry.get("w_bits"), quant["weight"], ptq["weight_observer"]),
            act=act,
            softmax=softmax,
        ))
    return rules


def rules_for_model(model: nn.Module, quant: Mapping[str, Any], ptq: Mapping[str, Any]) -> list[QuantRule]:
    """:func:`rules_from_config`, plus the post-GELU layers' own rules when the recipe sets
    ``ptq.post_gelu_quantizer`` (found on ``model`` by data flow) and per-channel input scales for its
    depthwise convolutions when it sets ``ptq.depthwise_input_channels``."""
    rules = rules_from_config(quant, ptq)
    if ptq.get("post_gelu_quantizer"):
        from saq.ptq.post_gelu import with_post_gelu_rules

        rules = with_post_gelu_rules(model, rules, ptq["post_gelu_quantizer"])
    if ptq.get("depthwise_input_channels"):
        from saq.ptq.depthwise import with_depthwise_channel_rules

        rules = with_depthwise_channel_rules(model, rules)
    return rules
