"""Tensor statistics that work on tensors of any size and stay on the tensor's device."""

from __future__ import annotations

import torch


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of all elements of x (nearest-rank), via kthvalue.

    torch.quantile refuses inputs above 2^24 elements; kthvalue has no such limit and needs no copy
    to the host.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    flat = x.detach().reshape(-1).float()
    k = int(round(q * (flat.numel() - 1))) + 1
    return flat.kthvalue(k).values


def quantiles(x: torch.Tensor, qs: list[float] | tuple[float, ...]) -> list[torch.Tensor]:
    """``quantile(x, q)`` for every q of ``qs`` from a single sort (a search over many clip
    percentiles of one tensor would otherwise run one selection per percentile)."""
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
    ordered = x.detach().reshape(-1).float().sort().values
    last = ordered.numel() - 1
    return [ordered[int(round(q * last))] for q in qs]


def channel_quantile(x: torch.Tensor, q: float, axis: int = 0) -> torch.Tensor:
    """Per-slice q-quantile along ``axis`` (nearest rank), shaped (C,)."""
    flat = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).float()
    k = int(round(q * (flat.shape[1] - 1))) + 1
    return flat.kthvalue(k, dim=1).values


def histogram(x: torch.Tensor, bins: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and bin centres of x over [min(x), max(x)] (``lo``/``hi``: those extremes, when the caller
    has them already)."""
    flat = x.detach().reshape(-1).float()
    if lo is None or hi is None:
        lo, hi = torch.aminmax(flat)
    lo, hi = lo.float(), hi.float()
    if hi <= lo:
        hi = lo + 1e-6
    if hi > lo and flat.device.type == "cpu":
        counts = _linear_bin_counts(flat, bins, lo, hi)
    else:  # histc widens a range that float32 cannot resolve (lo + 1e-6 == lo)
        counts = torch.histc(flat, bins=bins, min=lo.item(), max=hi.item())
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, device=flat.device, dtype=flat.dtype) + 0.5)
    return counts, centres


def _linear_bin_counts(flat: torch.Tensor, bins: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``torch.histc(flat, bins, lo, hi)`` for values inside [lo, hi], the same counts: histc's CPU kernel
    bins each element as int((x - lo) * bins / (hi - lo)) in float32, the last edge into the last bin,
    one element at a time; the same arithmetic as tensor ops and a bincount of int32 indices is about 1.4-1.7x
    faster on activations of 4-16M elements. For a power-of-two ``bins`` (the default 2048) the product and
    quotient are one division by (hi - lo) / bins (scaling by a power of two is exact, so both round the same
    real number), and elements on the last edge are counted in an extra bin added to the last one instead
    of clamping every index."""
    width = (hi - lo) / bins
    if bins & (bins - 1) or width < torch.finfo(flat.dtype).tiny:  # not a power of two, or a subnormal width
        index = (flat - lo).mul_(bins).div_(hi - lo).to(torch.int32).clamp_(0, bins - 1)
        return torch.bincount(index, minlength=bins).to(flat.dtype)
    counts = torch.bincount(torch.sub(flat, lo).div_(width).to(torch.int32), minlength=bins + 1)
    counts[bins - 1] += counts[bins]
    return counts[:bins].to(flat.dtype)
