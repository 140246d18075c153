"""Observers: collect statistics of a tensor during calibration and propose a quantization range.

An observer never changes the tensor. ``update`` is called once per calibration batch;
``compute_range`` returns (min, max) shaped like the quantizer's parameters. Observers are plain
objects (not modules) so they never leak into a state_dict.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from saq.quant import stats
from saq.quant.functional import MIN_SCALE, compute_qparams, fake_quantize, int_range
from saq.quant.granularity import Granularity, PerTensor
from saq.utils.errors import SaqUserError


class CalibrationDataError(SaqUserError, ValueError):
    """Raised when calibration activations are not finite."""


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/inf in x, from one min/max pass (NaN propagates to both, an inf shows as one of them): an
    elementwise isfinite builds a boolean tensor of x's size and costs about 10x more on CPU."""
    if x.numel() == 0 or not x.is_floating_point():
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class Observer:
    """Base class: tracks nothing, subclasses implement ``_observe`` and ``compute_range``."""

    def __init__(self, bits: int, symmetric: bool, granularity: Granularity) -> None:
        self.bits = bits
        self.symmetric = symmetric
        self.granularity = granularity
        self.num_updates = 0
        self.name = "observer"  # set by the owning quantizer for error messages

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not all_finite(x):
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationDataError(
                f"{bad} non-finite values (NaN/Inf) reached quantizer '{self.name}' during calibration; "
                "check the calibration images and the FP checkpoint (does the FP model produce finite "
                "outputs on them?)"
            )
        self._observe(x)
        self.num_updates += 1

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # helpers -------------------------------------------------------------------------------------
    def _reduce(self, x: torch.Tensor, fn: Callable) -> torch.Tensor:
        dims = self.granularity.reduce_dims(x.ndim)
        return fn(x, dim=dims).reshape(self.granularity.param_shape(tuple(x.shape)))

    def _require_updates(self) -> None:
        if self.num_updates == 0:
            raise RuntimeError(f"observer of '{self.name}' saw no data: calibration did not reach it")


class MinMaxObserver(Observer):
    """Global min and max over all calibration batches."""

    def __init__(self, bits, symmetric, granularity) -> None:
        super().__init__(bits, symmetric, granularity)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _observe(self, x):
        lo, hi = self._reduce(x, torch.amin), self._reduce(x, torch.amax)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def compute_range(self):
        self._require_updates()
        return self.min_val, self.max_val


class _AveragingObserver(Observer):
    """Averages a per-batch range estimate over batches (running mean or exponential average)."""

    def __init__(self, bits, symmetric, granularity, momentum: float | None = None) -> None:
        super().__init__(bits, symmetric, granularity)
        self.momentum = momentum
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _observe(self, x):
        lo, hi = self._batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        elif self.momentum is None:  # running mean over batches
            n = self.num_updates
            self.min_val = (self.min_val * n + lo) / (n + 1)
            self.max_val = (self.max_val * n + hi) / (n + 1)
        else:
            m = self.momentum
            self.min_val = m * self.min_val + (1 - m) * lo
            self.max_val = m * self.max_val + (1 - m) * hi

    def compute_range(self):
        self._require_updates()
        return self.min_val, self.max_val


class EMAMinMaxObserver(_AveragingObserver):
    """Exponential moving average of per-batch min and max."""

    def __init__(self, bits, symmetric, granularity, momentum: float = 0.9) -> None:
        super().__init__(bits, symmetric, granularity, momentum=momentum)

    def _batch_range(self, x):
        return self._reduce(x, torch.amin), self._reduce(x, torch.amax)


class PercentileObserver(_AveragingObserver):
    """Per-batch lower/upper percentile (e.g. 0.01% / 99.99%), averaged over batches."""

    def __init__(self, bits, symmetric, granularity, percentile: float = 99.99) -> None:
        super().__init__(bits, symmetric, granularity)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.q = percentile / 100.0

    def _batch_range(self, x):
        if isinstance(self.granularity, PerTensor):
            return stats.quantile(x, 1 - self.q), stats.quantile(x, self.q)
        axis = self.granularity.axis
        shape = self.granularity.param_shape(tuple(x.shape))
        lo = stats.channel_quantile(x, 1 - self.q, axis).reshape(shape)
        hi = stats.channel_quantile(x, self.q, axis).reshape(shape)
        return lo, hi


def repeated_slice(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x[:1], n) when x repeats one slice n times along dim 0, else (x, 1). The mask decoder repeats the
    image's keys and positional encoding once per prompt: their histogram is the slice's times n (the
    same counts), at a fraction of the cost; comparing stops at the first differing element."""
    if x.dim() >= 2 and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
        return x[:1], x.shape[0]
    return x, 1


def _histogram_errors(counts, centres, lo, hi, bits, symmetric, p):
    """Lp quantization error of a histogram for K candidate ranges (lo, hi each shaped (K,))."""
    qp = compute_qparams(lo, hi, bits, symmetric)
    scale, zp = qp.scale[:, None], qp.zero_point[:, None]
    deq = fake_quantize(centres[None, :], scale, zp, qp.qmin, qp.qmax)
    return ((deq - centres[None, :]).abs().pow(p) * counts[None, :]).sum(dim=1)


class LpSearchObserver(_AveragingObserver):
    """Range that minimises the Lp quantization error, searched over shrunken [min, max].

    Per-tensor: a histogram of each batch is scored against ``grid`` shrink factors of the batch
    range (fast on activations of millions of elements); the best ranges are averaged over batches.
    Per-channel (weights): the error is evaluated exactly for every channel and factor; with
    ``zero_point_search`` (asymmetric only) every factor's step is tried with every zero point of the
    integer range, a 2-D grid of ``grid`` ranges x 2^bits zero points per channel.
    With ``independent_bounds`` the per-tensor lower and upper bounds shrink independently (a 2-D
    search).
    """

    def __init__(self, bits, symmetric, granularity, p: float = 2.4, grid: int = 100,
                 bins: int = 2048, independent_bounds: bool = False, min_ratio: float = 0.01,
                 zero_point_search: bool = False) -> None:
        super().__init__(bits, symmetric, granularity)
        self.p, self.grid, self.bins = p, grid, bins
        self.independent_bounds = independent_bounds
        self.min_ratio = min_ratio
        self.zero_point_search = zero_point_search

    def _factors(self, device) -> torch.Tensor:
        return torch.linspace(self.min_ratio, 1.0, self.grid, device=device)

    def _candidates(self, lo: torch.Tensor, hi: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._factors(device)
        if self.independent_bounds:
            fl, fh = torch.meshgrid(f, f, indexing="ij")
            return lo * fl.reshape(-1), hi * fh.reshape(-1)
        return lo * f, hi * f

    def _histogram(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts, centres, min, max) of one per-tensor batch; a slice the batch repeats is counted once
        per copy."""
        sample, repeats = repeated_slice(x)
        x_min, x_max = torch.aminmax(sample)
        counts, centres = stats.histogram(sample, self.bins, x_min, x_max)
        if repeats > 1:
            counts = counts * repeats
        return counts, centres, x_min, x_max

    def _best_range(self, counts: torch.Tensor, centres: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate range of [x_min, x_max] with the least Lp error over the histogram."""
        lo, hi = torch.clamp(x_min, max=0.0), torch.clamp(x_max, min=0.0)
        cand_lo, cand_hi = self._candidates(lo, hi, counts.device)
        err = _histogram_errors(counts, centres, cand_lo, cand_hi, self.bits, self.symmetric, self.p)
        best = int(err.argmin())
        return cand_lo[best], cand_hi[best]

    def _batch_range(self, x):
        x = x.float()
        if isinstance(self.granularity, PerTensor):
            return self._best_range(*self._histogram(x))
        return self._per_channel_range(x)

    def _per_channel_range(self, x):
        axis = self.granularity.axis
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, M)
        if self.zero_point_search and not self.symmetric:
            best_lo, best_hi = self._range_zero_point_search(rows)
            shape = self.granularity.param_shape(tuple(x.shape))
            return best_lo.reshape(shape), best_hi.reshape(shape)
        lo = rows.amin(dim=1).clamp(max=0.0)
        hi = rows.amax(dim=1).clamp(min=0.0)
        f = self._factors(x.device)
        best_err = torch.full_like(lo, math.inf)
        best_lo, best_hi = lo.clone(), hi.clone()
        # Weights use a 1-D shrink even with independent bounds: a 2-D grid per channel costs
        # grid^2 passes over every weight and buys little on per-channel ranges.
        for a in f:  # loop over factors, vectorised over channels: memory stays O(C*M)
            b = a
            qp = compute_qparams(lo * a, hi * b, self.bits, self.symmetric)
            deq = fake_quantize(rows, qp.scale[:, None], qp.zero_point[:, None], qp.qmin, qp.qmax)
            err = (deq - rows).abs().pow(self.p).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * a, best_lo)
            best_hi = torch.where(better, hi * b, best_hi)
        shape = self.granularity.param_shape(tuple(x.shape))
        return best_lo.reshape(shape), best_hi.reshape(shape)


    def _range_zero_point_search(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the (step, zero point) pair with the lowest Lp error: steps are ``grid``
        fractions of the full channel range over the 2^bits - 1 intervals, zero points every integer
        code. Returned as the (lo, hi) that ``compute_qparams`` maps back to exactly that pair.

        For a fixed step the error is a convex sequence in the integer zero point (each element's error
        is flat while it is inside the clamp window and grows convexly, as |t|^p does, once the window
        clamps it), so a bisection on the sign of E(z + 1) - E(z) finds the smallest minimising zero
        point with 2 * bits + 1 error evaluations instead of 2^bits."""
        qmin, qmax = int_range(self.bits, self.symmetric)
        levels = qmax - qmin
        span = (rows.amax(dim=1).clamp(min=0.0) - rows.amin(dim=1).clamp(max=0.0)).clamp_min(MIN_SCALE)
        best_err = torch.full_like(span, math.inf)
        best_scale, best_zp = span / levels, torch.full_like(span, float(qmin))
        for fraction in torch.linspace(1.0 / self.grid, 1.0, self.grid, device=rows.device):
            scale = (span * fraction / levels).clamp_min(MIN_SCALE)[:, None]  # (C, 1)
            codes = torch.round(rows / scale)

            def error(zp: torch.Tensor) -> torch.Tensor:  # (C,) error of each channel at its zero point
                # with an integer zero point, clamp(round(x/s) + z) - z = clamp(round(x/s), qmin - z, qmax - z)
                z = zp[:, None]
                deq = torch.maximum(torch.minimum(codes, qmax - z), qmin - z) * scale
                return (deq - rows).abs().pow(self.p).sum(dim=1)

            low = torch.full_like(span, float(qmin))
            high = torch.full_like(span, float(qmax))
            while bool((low < high).any()):
                mid = torch.floor((low + high) / 2)
                rising = error(mid + 1) >= error(mid)  # the minimum is at mid or below
                open_ = low < high
                high = torch.where(open_ & rising, mid, high)
                low = torch.where(open_ & ~rising, mid + 1, low)
            err = error(low)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale[:, 0], best_scale)
            best_zp = torch.where(better, low, best_zp)
        return (qmin - best_zp) * best_scale, (qmax - best_zp) * best_scale


class MSEObserver(LpSearchObserver):
    """Lp search with p = 2.4 (the PTQ4SAM/QDrop convention): per-tensor a symmetric shrink of the
    range; per-channel (weights) a 2-D grid of ranges x zero points unless ``zero_point_search=False``."""

    def __init__(self, bits, symmetric, granularity, p: float = 2.4, grid: int = 100, bins: int = 2048,
                 zero_point_search: bool = True) -> None:
        super().__init__(bits, symmetric, granularity, p=p, grid=grid, bins=bins,
                         zero_point_search=zero_point_search)


class PooledMSEObserver(LpSearchObserver):
    """The MSE observer's search (Lp error, p = 2.4, one shrink factor of [min, max]) run once on all
    calibration batches together instead of per batch and averaged: the range of least error over the
    calibration distribution, not the mean of each batch's best range. Per tensor it keeps each batch's
    histogram (``bins`` bins over the batch's own range) and scores every candidate on all of them; per
    channel it is the MSE observer."""

    def __init__(self, bits, symmetric, granularity, p: float = 2.4, grid: int = 100, bins: int = 2048,
                 zero_point_search: bool = True) -> None:
        super().__init__(bits, symmetric, granularity, p=p, grid=grid, bins=bins, zero_point_search=zero_point_search)
        self.histograms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (counts, centres) per batch
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe(self, x):
        if not isinstance(self.granularity, PerTensor):
            return super()._observe(x)
        counts, centres, x_min, x_max = self._histogram(x.float())
        self.histograms.append((counts, centres))
        self.lo = x_min if self.lo is None else torch.minimum(self.lo, x_min)
        self.hi = x_max if self.hi is None else torch.maximum(self.hi, x_max)

    def compute_range(self):
        self._require_updates()
        if not isinstance(self.granularity, PerTensor):
            return super().compute_range()
        counts = torch.cat([c for c, _ in self.histograms])
        centres = torch.cat([c for _, c in self.histograms])
        return self._best_range(counts, centres, self.lo, self.hi)


class OMSEObserver(LpSearchObserver):
    """OMSE: the L2-optimal clipping range with lower and upper bounds searched independently."""

    def __init__(self, bits, symmetric, granularity, grid: int = 40, bins: int = 2048) -> None:
        super().__init__(bits, symmetric, granularity, p=2.0, grid=grid, bins=bins, independent_bounds=True)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema_minmax": EMAMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "mse_pooled": PooledMSEObserver,
    "omse": OMSEObserver,
}


def build_observer(name: str, bits: int, symmetric: bool, granularity: Granularity, **kwargs) -> Observer:
    """Instantiate an observer by its config name."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](bits, symmetric, granularity, **kwargs)
