"""PTQ4SAM's bimodal integration (BIG), folded offline into the decoder's token-to-image attentions.

The key projection output of a token-to-image cross-attention can be bimodal as a tensor while each
channel sits on one of the two peaks. Flipping the sign of those channels in BOTH q_proj and k_proj
leaves every per-head q.k product unchanged (g^2 = 1) and turns k into a unimodal tensor that a
per-tensor quantizer handles far better. Detection (docs/method.md section 3): a Gaussian KDE of k on one
the prompts of the first calibration image has exactly two peaks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from saq.data.calibration import CalibrationItem
from saq.ptq.image_source import ImageSource
from saq.models.predictor import decode_boxes
from saq.quant.quantizer import FakeQuantizer, QuantMode, quant_mode

KDE_MAX_POINTS = 20000  # subsample for speed; the KDE of 20k points is smooth enough for 128 grid points
KDE_SEED = 0


def _kde_sample(x: torch.Tensor, max_points: int, seed: int) -> torch.Tensor:
    """Flattened float values of x on the CPU, a seeded subsample when there are more than max_points."""
    flat = x.detach().reshape(-1)
    if flat.numel() > max_points:
        generator = torch.Generator().manual_seed(seed)
        idx = torch.randperm(flat.numel(), generator=generator)[:max_points]
        flat = flat[idx.to(flat.device)]
    return flat.float().cpu()


def kde_density(x: torch.Tensor, grid: int = 128, max_points: int = KDE_MAX_POINTS,
                seed: int = KDE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid points between min and max of x, Gaussian KDE density there). The bandwidth follows
    Scott's rule on the full tensor (its std and size, docs/method.md section 3); the density is summed over
    a seeded subsample of at most ``max_points`` values for speed."""
    if x.numel() == 0:
        raise ValueError("kde of an empty tensor")
    if not torch.isfinite(x).all():
        raise ValueError("kde input has non-finite values")
    points = torch.linspace(float(x.min()), float(x.max()), grid, dtype=torch.float64)
    sample = _kde_sample(x, max_points, seed).double()
    n = sample.numel()
    full = x.detach().reshape(-1).double()
    std = full.std() if full.numel() > 1 else torch.zeros((), dtype=torch.float64)
    if std <= 0:  # constant input: no spread to estimate a bandwidth from
        return points, (points == sample[0]).double()
    bandwidth = float(std) * full.numel() ** (-1.0 / 5.0)  # Scott's rule in one dimension, full tensor
    z = (points[:, None] - sample[None, :]) / bandwidth
    density = torch.exp(-0.5 * z * z).sum(dim=1) / (n * bandwidth * math.sqrt(2.0 * math.pi))
    return points, density


def _find_peaks(density: torch.Tensor, height: float, min_distance: int) -> list[int]:
    """Interior local maxima >= height, at least min_distance apart (higher peaks win)."""
    d = density.tolist()
    candidates = [i for i in range(1, len(d) - 1) if d[i] > d[i - 1] and d[i] >= d[i + 1] and d[i] >= height]
    kept: list[int] = []
    for i in sorted(candidates, key=lambda j: -d[j]):
        if all(abs(i - k) >= min_distance for k in kept):
            kept.append(i)
    return sorted(kept)


def kde_peaks(x: torch.Tensor, grid: int = 128, height_frac: float = 0.01, min_distance: int = 32) -> list[int]:
    """Grid indices of the peaks of the Gaussian KDE of x's values (see docs/method.md section 3)."""
    if x.numel() > 0 and bool(x.min() == x.max()):  # constant input: one mode, the grid collapses
        return [0]
    _, density = kde_density(x, grid)
    return _find_peaks(density, height_frac * float(density.sum()), min_distance)


def is_bimodal(k: torch.Tensor) -> bool:
    """True iff the KDE of k's values has exactly two peaks."""
    return len(kde_peaks(k)) == 2


def channel_signs(k: torch.Tensor) -> torch.Tensor:
    """Per-channel sign (+1 / -1) of the mean of k (..., C) over all but the last dim; sign(0) = +1."""
    means = k.detach().reshape(-1, k.shape[-1]).float().mean(dim=0)
    return torch.where(means < 0, -torch.ones_like(means), torch.ones_like(means)).to(k.dtype)


def _calibrated_quantizers(attention: nn.Module) -> list[str]:
    return [name for name, m in attention.named_modules()
            if isinstance(m, FakeQuantizer) and (m.is_calibrated or m.observer is not None)]


@torch.no_grad()
def fold_signs_(attention: nn.Module, signs: torch.Tensor) -> None:
    """Multiply the output rows (and biases) of q_proj and k_proj by ``signs`` in place.

    Every per-head q.k is unchanged because signs^2 = 1. Must run before any observer: ranges taken
    before the fold would no longer match the weights.
    """
    q_proj, k_proj = attention.q_proj, attention.k_proj
    out_features = k_proj.weight.shape[0]
    if signs.shape != (out_features,) or q_proj.weight.shape[0] != out_features:
        raise ValueError(f"signs of shape {tuple(signs.shape)} do not match q_proj/k_proj with "
                         f"{q_proj.weight.shape[0]}/{out_features} outputs")
    if not bool((signs.abs() == 1).all()):
        raise ValueError("signs must be +1 or -1")
    stale = _calibrated_quantizers(attention)
    if stale:
        raise RuntimeError(f"bimodal folding must run before calibration, but {stale[:4]} already hold "
                           "statistics or ranges")
    for proj in (q_proj, k_proj):
        g = signs.to(device=proj.weight.device, dtype=proj.weight.dtype)
        proj.weight.mul_(g[:, None])
        if proj.bias is not None:
            proj.bias.mul_(g)


def TOKEN_TO_IMAGE_ATTENTIONS(model: nn.Module) -> list[str]:  # noqa: N802 (name fixed by the callers)
    """Module names of the mask decoder's token-to-image cross-attentions (one per layer + the final one)."""
    layers = model.mask_decoder.transformer.layers
    names = [f"mask_decoder.transformer.layers.{i}.cross_attn_token_to_image" for i in range(len(layers))]
    return names + ["mask_decoder.transformer.final_attn_token_to_image"]


def bimodal_fold_(model: nn.Module, item: CalibrationItem, show_progress: bool = False,
                  images: ImageSource | None = None) -> dict[str, bool]:
    """Detect bimodal keys on all prompts of ``item`` (FP model) and fold signs where found.

    Returns {attention name: folded}. Call before calibration observers run.
    """
    if not item.prompts:
        raise ValueError(f"calibration image {item.image.path} has no prompt for bimodal detection")
    names = TOKEN_TO_IMAGE_ATTENTIONS(model)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    try:
        for name in names:
            def hook(_module, _inputs, output, _name=name):
                captured[_name].append(output.detach())

            handles.append(model.get_submodule(name).k_proj.register_forward_hook(hook))
        with quant_mode(model, QuantMode.OFF):
            encoded = (images or ImageSource(model)).fp_embedding(item.image.path)
            decode_boxes(model, encoded, torch.tensor([p.box_xyxy for p in item.prompts]), return_masks=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if not captured[name]]
    if missing:
        raise RuntimeError(f"the decoder never ran the key projection of {missing}")
    folded: dict[str, bool] = {}
    for name in tqdm(names, desc="bimodal", disable=not show_progress, leave=False):
        k = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[name]])
        bimodal = is_bimodal(k)
        if bimodal:
            fold_signs_(model.get_submodule(name), channel_signs(k))
        folded[name] = bimodal
    return folded
