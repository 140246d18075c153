"""Channel reparameterization of post-LayerNorm activations (docs/method.md, "Channel reparameterization").

A few channels of a LayerNorm's output span ranges far wider than the others, so one per-tensor step
wastes most 4-bit codes on them. For each LayerNorm feeding a Linear directly, the calibration data
gives every channel c a range [lo_c, hi_c]; the channel is rescaled by r_c = (width_c / mean width)^strength
and shifted by o_c, x~_c = (x_c - o_c) / r_c, which is folded exactly:

    LayerNorm:  gamma~ = gamma / r,  beta~ = (beta - o) / r
    Linear:     W~ = W diag(r),      b~ = b + W o

With strength 1 and the shift on, every channel ends with the same range (RepQ-ViT's per-channel
scales and zero points made per tensor). The FP model computes the same function (checked on a
calibration image after folding); the deployed activation quantizer stays per tensor, and only
weights, biases and LayerNorm parameters change, so the export is unchanged.

The shift is left out where zero padding sits between the LayerNorm and the Linear (SAM ViT's windowed
blocks pad the normalized tokens with zeros, which then would no longer mean zero).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from saq.data.calibration import CalibrationItem
from saq.models.image_source import ImageSource
from saq.models.predictor import encode_image
from saq.quant.quantizer import QuantMode, quant_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NormLinearPair:
    norm: str  # a LayerNorm whose output is the Linear's whole input
    linear: str
    shift: bool  # False where zero padding separates the two (the shift would not be exact there)


def norm_linear_pairs(model: nn.Module, prefix: str = "image_encoder") -> list[NormLinearPair]:
    """The LayerNorm -> Linear pairs of the encoder blocks this project knows: TinyViT's attention and
    MLP (``norm`` then ``qkv`` / ``fc1``, padding applied before the norm) and SAM ViT blocks
    (``norm1`` then ``attn.qkv``, windows padded after the norm; ``norm2`` then ``mlp.lin1``)."""
    root = model.get_submodule(prefix)
    pairs = []
    for name, module in root.named_modules():
        base = f"{prefix}.{name}" if name else prefix
        norm = getattr(module, "norm", None)
        if isinstance(norm, nn.LayerNorm):
            for child in ("qkv", "fc1"):
                if isinstance(getattr(module, child, None), nn.Linear):
                    pairs.append(NormLinearPair(f"{base}.norm", f"{base}.{child}", shift=True))
        attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
        if isinstance(getattr(module, "norm1", None), nn.LayerNorm) and isinstance(getattr(attn, "qkv", None), nn.Linear):
            pairs.append(NormLinearPair(f"{base}.norm1", f"{base}.attn.qkv", shift=False))
        if isinstance(getattr(module, "norm2", None), nn.LayerNorm) and isinstance(getattr(mlp, "lin1", None), nn.Linear):
            pairs.append(NormLinearPair(f"{base}.norm2", f"{base}.mlp.lin1", shift=True))
    return pairs


@torch.no_grad()
def channel_ranges(model: nn.Module, norms: list[str], items: list[CalibrationItem],
                   images: ImageSource | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel min and max of each LayerNorm's output over the calibration images (FP model)."""
    images = images or ImageSource(model)
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(_module, _args, out):
            flat = out.detach().reshape(-1, out.shape[-1]).float()
            lo, hi = flat.amin(0), flat.amax(0)
            if name in ranges:
                lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
            ranges[name] = (lo, hi)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in norms]
    try:
        with quant_mode(model, QuantMode.OFF):
            for item in items:
                encode_image(model, images.image(item.image.path))
    finally:
        for h in handles:
            h.remove()
    return ranges


def reparam_factors(lo: torch.Tensor, hi: torch.Tensor, strength: float, shift: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, o): x~ = (x - o) / r gives channel c the range [mean lo, mean lo + mean width] at strength 1."""
    width = (hi - lo).clamp_min(1e-8)
    mean_width = width.mean()
    r = (width / mean_width).pow(strength).clamp_min(1e-4)  # dead channels keep a finite factor
    if not shift:
        return r, torch.zeros_like(r)
    o = lo - r * lo.mean()
    return r, o


@torch.no_grad()
def fold_pair_(norm: nn.LayerNorm, linear: nn.Linear, r: torch.Tensor, o: torch.Tensor) -> None:
    """Fold x~ = (x - o) / r into the LayerNorm and the Linear (exact in real arithmetic)."""
    if norm.weight is None or norm.bias is None:
        raise ValueError("channel reparameterization needs an affine LayerNorm")
    r = r.to(norm.weight)
    o = o.to(norm.weight)
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
    linear.bias.add_(linear.weight @ o)  # with the unscaled W: b~ = b + W o
    linear.weight.mul_(r)  # W~ = W diag(r): column c times r_c
    norm.weight.div_(r)
    norm.bias.sub_(o).div_(r)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def reparam_(model: nn.Module, items: list[CalibrationItem], strength: float = 1.0, shift: bool = True,
             images: ImageSource | None = None, tolerance: float = 1e-3) -> dict:
    """Reparameterize every LayerNorm -> Linear pair of the encoder; returns what was folded.

    Checks on the first calibration image that the FP image embedding did not change (relative error
    below ``tolerance``, float32 rounding only) and raises otherwise: a fold that changes the FP model
    would be a silent accuracy change, not a reparameterization.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"ptq.reparam.strength={strength}: use a value in [0, 1] (1 = equal channel ranges)")
    images = images or ImageSource(model)
    pairs = norm_linear_pairs(model)
    if not pairs:
        log.warning("channel reparameterization: no LayerNorm -> Linear pair in the image encoder; nothing folded")
        return {"pairs": 0}
    probe = images.image(items[0].image.path)
    with quant_mode(model, QuantMode.OFF):
        before = encode_image(model, probe).embedding.clone()
    ranges = channel_ranges(model, [p.norm for p in pairs], items, images)
    spreads = []
    for pair in pairs:
        lo, hi = ranges[pair.norm]
        r, o = reparam_factors(lo, hi, strength, shift and pair.shift)
        fold_pair_(model.get_submodule(pair.norm), model.get_submodule(pair.linear), r, o)
        width = hi - lo
        spreads.append(float(width.max() / width.clamp_min(1e-8).median()))
    with quant_mode(model, QuantMode.OFF):
        after = encode_image(model, probe).embedding
    error = _relative_error(after, before)
    if error > tolerance:
        raise RuntimeError(f"channel reparameterization changed the FP image embedding by {error:.2e} (relative); "
                           "a LayerNorm -> Linear pair is not what saq.ptq.reparam assumes")
    images.forget_embeddings()  # cached FP embeddings were computed before the fold (same values, new weights)
    return {"pairs": len(pairs), "strength": strength, "shift": shift, "fp_embedding_relative_error": error,
            "max_over_median_channel_width": round(max(spreads), 2)}
