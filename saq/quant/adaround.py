"""AdaRound: learned rounding of weights (rectified sigmoid, annealed regulariser).

W^ = s * (clamp(floor(W / s) + h(alpha) + z, qmin, qmax) - z), h(alpha) = clip(sigmoid(alpha) (zeta -
gamma) + gamma, 0, 1). alpha starts where h(alpha) equals the fractional part of W / s, so the soft
weights start at the FP weights; the regulariser pushes h to 0 or 1; ``harden`` rounds h at 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_alpha(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """alpha with h(alpha) = frac(W / s) (inverse of the rectified sigmoid, clamped inside (0, 1))."""
    frac = (weight / scale) - torch.floor(weight / scale)
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def soft_quantize(weight, alpha, scale, zero_point, qmin, qmax) -> torch.Tensor:
    q = torch.clamp(torch.floor(weight / scale) + rectified_sigmoid(alpha) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fixed_quantize(weight, rounding, scale, zero_point, qmin, qmax) -> torch.Tensor:
    """Quantize with a fixed per-weight rounding decision (0 = down, 1 = up)."""
    q = torch.clamp(torch.floor(weight / scale) + rounding + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def rounding_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1."""
    return (1 - (2 * rectified_sigmoid(alpha) - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class BetaSchedule:
    """beta decays from ``start`` to ``end`` after a warm-up fraction; no regulariser during warm-up."""

    iters: int
    start: float = 20.0
    end: float = 2.0
    warmup: float = 0.2

    def active(self, step: int) -> bool:
        return step >= self.warmup * self.iters

    def beta(self, step: int) -> float:
        begin = self.warmup * self.iters
        if step < begin:
            return self.start
        progress = (step - begin) / max(self.iters - begin, 1)
        return self.end + (self.start - self.end) * max(0.0, 1 - progress)


def lsq_grad_scale(numel: int, qmax: int) -> float:
    """LSQ's gradient scale for a step size: 1 / sqrt(numel * qmax)."""
    return 1.0 / math.sqrt(max(numel * max(qmax, 1), 1))
