"""A calibrated, hardened tiny SAM saved as ``saq.ptq`` saves it, and what the export tests compare it with."""

from __future__ import annotations

import numpy as np
import torch

from saq.export import save_quantized
from saq.models import build_tiny_sam
from saq.models.predictor import decode_boxes, encode_image
from saq.nn import QuantRule, harden_weights_, quantize_
from saq.ptq.calibrate import calibrate_weights_, is_activation
from saq.quant import QuantMode, QuantSpec, iter_quantizers, quant_mode, set_quant_mode

BOXES = torch.tensor([[10.0, 12.0, 90.0, 100.0], [40.0, 30.0, 120.0, 70.0], [0.0, 0.0, 60.0, 60.0],
                      [70.0, 80.0, 127.0, 127.0]])


def photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea()]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def quantized_tiny(path, w_bits=8, a_bits=8, softmax: QuantSpec | None = None, symmetric_weights: bool = False,
                    damage=None):
    """A calibrated, hardened tiny SAM saved as saq.ptq does (min-max ranges from three photos);
    ``damage(model)`` changes it just before saving."""
    model = build_tiny_sam(seed=0).eval()
    rule = QuantRule("*", QuantSpec(w_bits, symmetric_weights, granularity="channel"), QuantSpec(a_bits), softmax)
    layout = quantize_(model, [QuantRule("prompt_encoder*"), rule])
    calibrate_weights_(model)
    with torch.no_grad(), quant_mode(model, QuantMode.OFF):
        set_quant_mode(model, QuantMode.OBSERVE, where=is_activation)
        for image in photos():
            decode_boxes(model, encode_image(model, image), BOXES, return_masks=False)
        for _, q in iter_quantizers(model):
            if q.mode is QuantMode.OBSERVE:
                q.finalize_observer()
    set_quant_mode(model, QuantMode.QUANTIZE)
    harden_weights_(model)
    if damage is not None:
        with torch.no_grad():
            damage(model)
    config = {"model": {"name": "tiny", "init_seed": 0, "checkpoint": None},
              "quant": {"name": f"w{w_bits}a{a_bits}"}, "ptq": {"name": "minmax"}}
    return save_quantized(path, model, layout, config)
