"""Reconstruction losses (pure functions: no logging, no state)."""

from __future__ import annotations

from typing import Any

import torch


def lp_loss(pred: Any, target: Any, p: float = 2.0, weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Mean over samples of sum_channels |pred - target|^p; tuples/lists are summed element-wise
    (with ``weights`` per element when given)."""
    if isinstance(pred, (tuple, list)):
        weights = weights or (1.0,) * len(pred)
        return sum(w * lp_loss(a, b, p) for w, a, b in zip(weights, pred, target))
    return (pred - target).abs().pow(p).sum(dim=-1).mean()
