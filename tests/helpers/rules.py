"""Quantization rules of the paper's protocol for hand-built test models."""

from saq.nn import QuantRule
from saq.quant import QuantSpec

# Kept FP by the protocol (conf/quant/parts/common.yaml); the heads exist only in TinyViT.
PROTOCOL_FP = ("prompt_encoder*", "image_encoder.patch_embed*", "image_encoder.head*", "image_encoder.norm_head*",
               "mask_decoder.output_upscaling*", "mask_decoder.output_hypernetworks_mlps*",
               "mask_decoder.iou_prediction_head*")


def protocol_rules(weight: QuantSpec, act: QuantSpec | None, *special: QuantRule) -> list[QuantRule]:
    """The protocol's FP parts, then ``special`` rules, then ``weight`` / ``act`` for everything else."""
    return [QuantRule(p) for p in PROTOCOL_FP] + list(special) + [QuantRule("*", weight, act)]


def w4a4(observer: str = "mse") -> list[QuantRule]:
    """W4A4 (weights per output channel) with one observer for weights and activations."""
    return protocol_rules(QuantSpec(4, granularity="channel", observer=observer), QuantSpec(4, observer=observer))
