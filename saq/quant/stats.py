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
    counts = torch.histc(flat, bins=bins, min=lo.item(), max=hi.item())
    width = (hi - lo) / bins
    centres = lo + width * (torch.arange(bins, device=flat.device, dtype=flat.dtype) + 0.5)
    return counts, centres
