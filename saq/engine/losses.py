"""Reconstruction losses (pure functions: no logging, no state)."""

from __future__ import annotations

from typing import Any

import torch


def lp_loss(pred: Any, target: Any, p: float = 2.0) -> torch.Tensor:
    """Mean over samples of sum_channels |pred - target|^p; tuples/lists are summed element-wise."""
    if isinstance(pred, (tuple, list)):
        return sum(lp_loss(a, b, p) for a, b in zip(pred, target))
    return (pred - target).abs().pow(p).sum(dim=-1).mean()
