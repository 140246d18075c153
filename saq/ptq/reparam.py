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
from saq.ptq.image_source import ImageSource
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
def output_channel_ranges(model: nn.Module, outputs: dict[str, tuple[str, tuple[int, ...] | None]],
                          items: list[CalibrationItem], images: ImageSource
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel min and max of module outputs over the calibration images (FP model). ``outputs``:
    key -> (module name, the output channels to keep, or None for all)."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(key, channels):
        index = None if channels is None else torch.tensor(channels)

        def record(_module, _args, out):
            flat = out.detach().reshape(-1, out.shape[-1])
            flat = (flat if index is None else flat[:, index.to(out.device)]).float()
            lo, hi = flat.amin(0), flat.amax(0)
            if key in ranges:
                lo, hi = torch.minimum(ranges[key][0], lo), torch.maximum(ranges[key][1], hi)
            ranges[key] = (lo, hi)
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(key, channels))
               for key, (name, channels) in outputs.items()]
    try:
        with quant_mode(model, QuantMode.OFF):
            for item in items:
                encode_image(model, images.image(item.image.path))
    finally:
        for h in handles:
            h.remove()
    return ranges


def channel_ranges(model: nn.Module, norms: list[str], items: list[CalibrationItem],
                   images: ImageSource | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel min and max of each LayerNorm's output over the calibration images (FP model)."""
    return output_channel_ranges(model, {n: (n, None) for n in norms}, items, images or ImageSource(model))


def _spread(lo: torch.Tensor, hi: torch.Tensor) -> float:
    """The widest channel's range over the median channel's."""
    width = hi - lo
    return float(width.max() / width.clamp_min(1e-8).median())


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


@dataclass(frozen=True)
class ValueProjection:
    attention: str  # an encoder attention whose ``qkv`` Linear computes v and whose ``proj`` Linear reads attn @ v
    value_rows: tuple[int, ...]  # the rows of qkv's output that hold v, in the order of proj's input channels


def value_projections(model: nn.Module, prefix: str = "image_encoder") -> list[ValueProjection]:
    """The encoder attentions whose value channels can be rescaled: TinyViT's (qkv output laid out per
    head as [q, k, v] of key_dim, key_dim and d channels) and SAM ViT's ([q, k, v] of C channels each)."""
    found = []
    for name, module in model.get_submodule(prefix).named_modules():
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            continue
        heads = int(getattr(module, "num_heads", 0))
        if all(hasattr(module, a) for a in ("key_dim", "d")):  # TinyViT
            kd, d = int(module.key_dim), int(module.d)
            rows = tuple(h * (2 * kd + d) + 2 * kd + j for h in range(heads) for j in range(d))
        elif heads and qkv.out_features == 3 * proj.in_features:  # SAM ViT
            rows = tuple(range(2 * proj.in_features, 3 * proj.in_features))
        else:
            continue
        if len(rows) == proj.in_features and max(rows) < qkv.out_features:
            found.append(ValueProjection(f"{prefix}.{name}" if name else prefix, rows))
    return found


def value_ranges(model: nn.Module, pairs: list[ValueProjection], items: list[CalibrationItem],
                 images: ImageSource) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel min and max of every attention's v over the calibration images (FP model)."""
    return output_channel_ranges(model, {p.attention: (f"{p.attention}.qkv", p.value_rows) for p in pairs},
                                 items, images)


@torch.no_grad()
def fold_values_(qkv: nn.Linear, proj: nn.Linear, rows: tuple[int, ...], r: torch.Tensor, o: torch.Tensor) -> None:
    """v~ = (v - o) / r in qkv's value rows, undone in proj: attention weights sum to 1 over the keys, so
    attn @ v~ = (attn @ v - o) / r, and proj(W diag(r), b + W o) gives back the same output."""
    index = torch.tensor(rows, device=qkv.weight.device)
    r, o = r.to(qkv.weight), o.to(qkv.weight)
    if qkv.bias is None:
        qkv.bias = nn.Parameter(torch.zeros(qkv.out_features, dtype=qkv.weight.dtype, device=qkv.weight.device))
    qkv.weight[index] = qkv.weight[index] / r[:, None]
    qkv.bias[index] = (qkv.bias[index] - o) / r
    if proj.bias is None:
        proj.bias = nn.Parameter(torch.zeros(proj.out_features, dtype=proj.weight.dtype, device=proj.weight.device))
    proj.bias.add_(proj.weight @ o)
    proj.weight.mul_(r)


def decoder_attentions(model: nn.Module) -> list[str]:
    """The mask decoder's attentions with q/k/v/out projections (segment-anything's two-way ``Attention``)."""
    return [name for name, m in model.named_modules() if name.startswith("mask_decoder.")
            and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))]


@torch.no_grad()
def projection_ranges(model: nn.Module, attentions: list[str], items: list[CalibrationItem],
                      images: ImageSource | None = None) -> dict[str, torch.Tensor]:
    """Per-channel max |output| of every q/k/v projection of ``attentions`` over the items (FP model)."""
    from saq.ptq.capture import run_items

    peaks: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, _args, out):
            peak = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return hook

    names = [f"{a}.{p}" for a in attentions for p in ("q_proj", "k_proj", "v_proj")]
    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        with quant_mode(model, QuantMode.OFF):
            run_items(model, items, images=images)
    finally:
        for h in handles:
            h.remove()
    return peaks


@torch.no_grad()
def balance_attention_(attention: nn.Module, q_peak: torch.Tensor, k_peak: torch.Tensor, v_peak: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel factors that leave the attention's output unchanged:
    q_c / a_c and k_c * a_c with a_c = sqrt(max|q_c| / max|k_c|) (QK^T is a sum of q_c k_c, so each channel
    of q and k ends with the range sqrt(max|q_c| max|k_c|)); v_c / b_c and the out projection's input column c
    times b_c with b_c = max|v_c| / mean max|v| (the attention map mixes tokens, not channels)."""
    eps = 1e-8
    a = (q_peak.clamp_min(eps) / k_peak.clamp_min(eps)).sqrt().clamp(1e-3, 1e3)
    b = (v_peak.clamp_min(eps) / v_peak.clamp_min(eps).mean()).clamp(1e-3, 1e3)
    for proj, factor in ((attention.q_proj, 1.0 / a), (attention.k_proj, a), (attention.v_proj, 1.0 / b)):
        factor = factor.to(proj.weight)
        proj.weight.mul_(factor[:, None])
        if proj.bias is not None:
            proj.bias.mul_(factor)
    attention.out_proj.weight.mul_(b.to(attention.out_proj.weight)[None, :])
    return a, b


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def reparam_(model: nn.Module, items: list[CalibrationItem], strength: float = 1.0, shift: bool = True,
             images: ImageSource | None = None, tolerance: float = 1e-3, attention: bool = False,
             values: bool = False) -> dict:
    """Reparameterize every LayerNorm -> Linear pair of the encoder (with ``values``, also the value
    channels of the encoder's attentions, the input of their output projection; with ``attention``,
    balance the q/k and v/out channels of the decoder's attentions); returns what was folded.

    Checks on the first calibration image that the FP image embedding did not change (relative error
    below ``tolerance``, float32 rounding only) and raises otherwise: a fold that changes the FP model
    would be a silent accuracy change, not a reparameterization.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"ptq.reparam.strength={strength}: use a value in [0, 1] (1 = equal channel ranges)")
    images = images or ImageSource(model)
    pairs = norm_linear_pairs(model)
    attentions = decoder_attentions(model) if attention else []
    value_pairs = value_projections(model) if values else []
    if not pairs and not attentions and not value_pairs:
        log.warning("channel reparameterization: no LayerNorm -> Linear pair in the image encoder; nothing folded")
        return {"pairs": 0}
    probe_item = items[0]
    probe = images.image(probe_item.image.path)
    with quant_mode(model, QuantMode.OFF):
        before = encode_image(model, probe).embedding.clone()
        before_masks = _decoder_logits(model, probe_item, images) if attentions else None
    ranges = channel_ranges(model, [p.norm for p in pairs], items, images)
    spreads = []
    for pair in pairs:
        lo, hi = ranges[pair.norm]
        r, o = reparam_factors(lo, hi, strength, shift and pair.shift)
        fold_pair_(model.get_submodule(pair.norm), model.get_submodule(pair.linear), r, o)
        spreads.append(_spread(lo, hi))
    value_spreads = []
    if value_pairs:
        v_ranges = value_ranges(model, value_pairs, items, images)
        for pair in value_pairs:
            lo, hi = v_ranges[pair.attention]
            r, o = reparam_factors(lo, hi, strength, shift)
            fold_values_(model.get_submodule(f"{pair.attention}.qkv"), model.get_submodule(f"{pair.attention}.proj"),
                         pair.value_rows, r, o)
            value_spreads.append(_spread(lo, hi))
    balanced = {}
    if attentions:
        peaks = projection_ranges(model, attentions, items, images)
        for name in attentions:
            a, b = balance_attention_(model.get_submodule(name), peaks[f"{name}.q_proj"], peaks[f"{name}.k_proj"],
                                      peaks[f"{name}.v_proj"])
            balanced[name] = {"qk_factor_range": [round(float(a.min()), 3), round(float(a.max()), 3)],
                              "v_factor_range": [round(float(b.min()), 3), round(float(b.max()), 3)]}
    with quant_mode(model, QuantMode.OFF):
        after = encode_image(model, probe).embedding
        after_masks = _decoder_logits(model, probe_item, images) if attentions else None
    error = _relative_error(after, before)
    if error > tolerance:
        raise RuntimeError(f"channel reparameterization changed the FP image embedding by {error:.2e} (relative); "
                           "a LayerNorm -> Linear pair is not what saq.ptq.reparam assumes")
    info = {"pairs": len(pairs), "strength": strength, "shift": shift, "fp_embedding_relative_error": error,
            "max_over_median_channel_width": round(max(spreads), 2) if spreads else None}
    if value_pairs:
        info.update(value_projections=len(value_pairs),
                    max_over_median_value_width=round(max(value_spreads), 2))
    if attentions:
        logit_error = _relative_error(after_masks, before_masks)
        if logit_error > tolerance:
            raise RuntimeError(f"balancing the decoder attentions changed the FP mask logits by {logit_error:.2e} "
                               "(relative); an attention is not what saq.ptq.reparam assumes")
        info.update(attentions=balanced, fp_mask_logits_relative_error=logit_error)
    images.forget_embeddings()  # cached FP embeddings were computed before the fold (same values, new weights)
    return info


def _decoder_logits(model: nn.Module, item: CalibrationItem, images: ImageSource) -> torch.Tensor:
    """The low-resolution mask logits and IoU predictions of the item's boxes, flattened."""
    from saq.models.predictor import decoder_batches

    encoded = encode_image(model, images.image(item.image.path))
    outputs = []
    for inputs in decoder_batches(model, encoded, torch.tensor([p.box_xyxy for p in item.prompts])):
        low_res, iou = model.mask_decoder(**inputs)
        outputs += [low_res.flatten(), iou.flatten()]
    return torch.cat(outputs)
