"""A quantizer whose 2^b levels are a calibrated table times a step: x^ = s * t[k], t[k] the level nearest x / s.

Built for post-GELU activations (the inputs of the layers a GELU feeds): a dense cluster around 0 with a
bounded negative side (GELU >= -0.17) and a sparse positive tail, where a uniform 4-bit grid spends most
of its 16 levels on the tail. The hybrid log-uniform table (docs/method.md section 11) holds

    N uniform levels on the negative side, 0, L log2-spaced levels below a split tau,
    U uniform levels from tau to the top                                    (N + 1 + L + U = 2^b)

in units of the step s (the top, i.e. the clipped maximum, so t[-1] = 1). :class:`HybridTableObserver`
chooses N, L, tau and the clipping by the mean squared error on a seeded sample of the calibration
activations; the uniform grid over the same range is one of its candidates, so the chosen table is never
worse than a uniform one in that error. Rounding is to the nearest level (not in the log domain).

Deployment: a 4-bit code indexes a 16-entry table, which an int8 runtime runs as a lookup, not as a
standard QuantizeLinear/DequantizeLinear pair; the ONNX export keeps these points in floating point and
lists them in export.json (``saq.export.qdq.qdq_expressible``).
"""

from __future__ import annotations

from typing import Iterable

import torch

from saq.quant.granularity import PerTensor
from saq.quant.observers import CalibrationDataError, Observer, all_finite
from saq.quant.qdrop import keep_fp_mask
from saq.quant.quantizer import FakeQuantizer, QuantMode, QuantSpec, Role, tensor_kwargs

DEFAULT_CLIPS = (1.0, 0.8, 0.6, 0.45, 0.3)  # top = clip x the observed maximum
DEFAULT_SPLITS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)  # tau as a fraction of the top
DEFAULT_SAMPLES = 2**18  # values kept per quantizer for the search
SAMPLES_PER_UPDATE = 2**15


def hybrid_table(n_levels: int, negative: float, n_neg: int, n_log: int, split: float) -> torch.Tensor:
    """The ascending hybrid log-uniform table in units of the top (t[-1] = 1): ``n_neg`` uniform levels on
    [negative, 0) (``negative`` <= 0, the observed minimum over the top), 0, ``n_log`` levels
    split * 2^-k (k = 1 .. n_log) and the remaining levels uniform on [split, 1]."""
    n_uniform = n_levels - 1 - n_neg - n_log
    if n_uniform < 2 or not 0.0 < split < 1.0 or (n_neg and negative >= 0.0):
        raise ValueError(f"no hybrid table with {n_levels} levels, n_neg={n_neg}, n_log={n_log}, "
                         f"split={split}, negative={negative}")
    neg = [negative * i / n_neg for i in range(n_neg, 0, -1)]
    logs = [split * 2.0**-k for k in range(n_log, 0, -1)]
    uniform = [split + (1.0 - split) * j / (n_uniform - 1) for j in range(n_uniform)]
    return torch.tensor(neg + [0.0] + logs + uniform, dtype=torch.float64).float()


def uniform_table(n_levels: int, negative: float) -> torch.Tensor:
    """A uniform grid of ``n_levels`` on [min(negative, 0), 1] (the baseline candidate of the search)."""
    return torch.linspace(min(negative, 0.0), 1.0, n_levels)


def nearest_levels(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest each element of ``u`` (ties to the upper level); out of range clamps."""
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(u, midpoints.to(u.dtype), right=True)


def rounded_to_table(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[nearest_levels(u, table)]``, computed as t[0] plus every step t[i+1] - t[i] whose midpoint
    u reaches: one vectorized comparison and one add per level instead of a binary search per element
    (about 2.5x faster on a CPU). Each element's sum runs through the steps in one order, so it ends on
    the running sum s[k]; where some s[k] is not exactly t[k] in u's dtype, the index path is used."""
    levels = table.to(u.dtype)
    midpoints = ((table[1:] + table[:-1]) / 2).to(u.dtype).tolist()  # as nearest_levels rounds them
    steps = levels.diff()
    running = levels[:1].clone()
    for step, level in zip(steps, levels[1:]):
        running = running + step
        if not torch.equal(running, level.reshape(1)):
            return levels[nearest_levels(u, table)]
    out = torch.full_like(u, float(levels[0]))
    reached = torch.empty_like(u)
    for midpoint, step in zip(midpoints, steps.tolist()):
        torch.ge(u, midpoint, out=reached)
        out.add_(reached, alpha=step)
    return out


def table_mse(u: torch.Tensor, table: torch.Tensor) -> float:
    """Mean squared error of rounding ``u`` to its nearest level of ``table``."""
    return float((rounded_to_table(u, table) - u).square().mean())


def _storage_order(x: torch.Tensor) -> torch.Tensor:
    """x's elements as a 1-D view in memory order (no copy for contiguous or channels-last tensors)."""
    if x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x.as_strided((x.numel(),), (1,))
    return x.reshape(-1)


class HybridTableObserver(Observer):
    """Keeps a seeded sample of the observed values and their extremes; :meth:`best` searches the table."""

    def __init__(self, bits: int, symmetric: bool = False, granularity=None, clips: Iterable[float] = DEFAULT_CLIPS,
                 splits: Iterable[float] = DEFAULT_SPLITS, max_log: int = 6, max_neg: int = 3,
                 samples: int = DEFAULT_SAMPLES) -> None:
        super().__init__(bits, symmetric=False, granularity=PerTensor())
        self.clips = tuple(float(c) for c in clips)
        self.splits = tuple(float(s) for s in splits)
        if not self.clips or any(not 0.0 < c <= 1.0 for c in self.clips) or any(not 0.0 < s < 1.0 for s in self.splits):
            raise ValueError(f"hybrid table search needs clips in (0, 1] and splits in (0, 1), got {clips}, {splits}")
        self.max_log, self.max_neg, self.samples = int(max_log), int(max_neg), int(samples)
        self.n_levels = 2**bits
        self.kept: list[torch.Tensor] = []
        self.lo: float = float("inf")
        self.hi: float = float("-inf")

    def update(self, x: torch.Tensor, values: torch.Tensor | None = None) -> None:
        x = x.detach()
        if not all_finite(x):
            raise CalibrationDataError(f"non-finite activations reached quantizer '{self.name}' during calibration; "
                                       "check the calibration images and the FP checkpoint")
        lo, hi = torch.aminmax(x)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        flat = _storage_order(x)
        if flat.numel() > SAMPLES_PER_UPDATE:
            # Seeded draws with replacement: a permutation of the whole tensor (tens of MB of indices per
            # forward) fragmented the heap until calibration ran out of memory.
            pick = torch.randint(flat.numel(), (SAMPLES_PER_UPDATE,),
                                 generator=torch.Generator().manual_seed(self.num_updates))
            flat = flat[pick.to(flat.device)]
        self.kept.append(flat.float().cpu().clone())
        self.num_updates += 1

    def sample(self) -> torch.Tensor:
        self._require_updates()
        values = torch.cat(self.kept)
        if values.numel() > self.samples:
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[: self.samples]]
        return values

    def candidates(self, negative: float) -> Iterable[torch.Tensor]:
        yield uniform_table(self.n_levels, negative)
        for n_neg in range(0, self.max_neg + 1 if negative < 0 else 1):
            for n_log in range(1, self.max_log + 1):
                if self.n_levels - 1 - n_neg - n_log < 2:
                    continue
                for split in self.splits:
                    yield hybrid_table(self.n_levels, negative, n_neg, n_log, split)

    @torch.no_grad()
    def best(self) -> tuple[float, torch.Tensor, float]:
        """(step s, table, mean squared error) of the candidate with the lowest error on the sample."""
        values = self.sample().double()
        if self.hi <= 0.0:
            raise CalibrationDataError(f"quantizer '{self.name}' saw no positive value: a post-GELU table needs "
                                       "a positive range (is it placed after a GELU?)")
        best: tuple[float, torch.Tensor, float] | None = None
        for clip in self.clips:
            top = clip * self.hi
            u = values / top
            negative = max(self.lo / top, -1.0) if self.lo < 0 else 0.0
            for table in self.candidates(negative):
                err = table_mse(u, table.double()) * top * top
                if best is None or err < best[2]:
                    best = (top, table, err)
        return best

    def compute_range(self):
        raise NotImplementedError("a table quantizer is calibrated by best(), not by a range")


class LevelTableQuantizer(FakeQuantizer):
    """Fake quantizer onto s * table (2^b ascending levels, per tensor). The step s can be learned (LSQ):
    every level scales with it; the table's shape stays as calibrated."""

    def __init__(self, spec: QuantSpec, role: Role, like: torch.Tensor | None = None) -> None:
        if role is not Role.ACTIVATION or spec.granularity != "tensor":
            raise ValueError("the level-table quantizer is for activations, per tensor "
                             f"(got role={role.value}, granularity={spec.granularity!r})")
        super().__init__(spec, role, like)
        self.n_levels = 2**spec.bits
        self.qmin, self.qmax = 0, self.n_levels - 1  # codes index the table
        self.zero_point = torch.zeros((), **tensor_kwargs(like))  # unused; kept so generic checks see a finite value
        self.register_buffer("table", torch.empty(0, **tensor_kwargs(like)))

    @property
    def is_calibrated(self) -> bool:
        return self.scale.numel() > 0 and self.table.numel() == self.n_levels

    def set_mode(self, mode: QuantMode) -> None:
        if mode is QuantMode.OBSERVE and self.observer is None:
            self.observer = HybridTableObserver(self.spec.bits, **self.spec.observer_kwargs)
            self.observer.name = self.extra_repr()
        self.mode = mode

    def set_table(self, scale: float | torch.Tensor, table: torch.Tensor) -> None:
        """Store the step s > 0 and the ascending table (2^b finite levels)."""
        scale_t = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(())
        table_t = torch.as_tensor(table, dtype=torch.float32).detach().reshape(-1)
        if table_t.numel() != self.n_levels or not torch.isfinite(table_t).all() or (table_t.diff() <= 0).any():
            raise ValueError(f"a {self.spec.bits}-bit table needs {self.n_levels} finite ascending levels, "
                             f"got {table_t.tolist()}")
        if not (torch.isfinite(scale_t) and scale_t > 0):
            raise ValueError(f"the table's step must be finite and positive, got {float(scale_t)}")
        where = {"device": self.table.device, "dtype": self.table.dtype}
        self.scale = scale_t.to(**where)
        self.table = table_t.to(**where)
        self.zero_point = torch.zeros((), **where)

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        raise TypeError("a level-table quantizer has no affine range: use set_table(scale, table) or its observer")

    def finalize_observer(self) -> None:
        if self.observer is None:
            raise RuntimeError(f"quantizer {self.extra_repr()} has no observer to finalize")
        scale, table, _ = self.observer.best()
        self.set_table(scale, table)
        self.observer = None

    def levels(self) -> torch.Tensor:
        """Every representable value, ascending."""
        return self.scale.detach() * self.table

    def int_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Table indices as floats, 0 .. 2^b - 1."""
        return nearest_levels(x.detach() / self.scale.detach(), self.table).to(self.table.dtype)

    def deploy_problems(self) -> list[str]:
        if self.table.numel() != self.n_levels:
            return [f"level table holds {self.table.numel()} levels, expected {self.n_levels}"]
        if not torch.isfinite(self.table).all() or (self.table.diff() <= 0).any():
            return ["level table is not finite and strictly ascending"]
        return []

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        if self.passthrough(x):
            return x
        dropping = self.drop_prob > 0.0 and self.training
        if not dropping and not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)):
            return rounded_to_table(x / self.scale.to(x.dtype), self.table).mul_(self.scale.to(x.dtype))
        table = self.table.to(x.dtype)
        scale = self._effective_scale(x.numel()).to(x.dtype)
        u = (x / scale).detach()
        level = rounded_to_table(u, self.table)
        inside = (u >= table[0]) & (u <= table[-1])
        # Value s * t exactly; straight through inside the table's range (d/dx = 1, d/ds = t - x/s),
        # clamped outside (d/dx = 0, d/ds = t). The added terms are exact zeros that carry the gradients.
        xq = scale * level
        xq = torch.where(inside, xq + (x - x.detach()) - (scale - scale.detach()) * u, xq)
        if dropping:
            xq = torch.where(keep_fp_mask(x, self.drop_prob, self.drop_draws), x, xq)
        return xq

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "table"  # empty before calibration, like the step: take the checkpoint's shape
        if key in state_dict:
            self.table = torch.empty(state_dict[key].shape, device=self.table.device, dtype=self.table.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        shape = "unset" if self.table.numel() == 0 else f"{self.table.numel()} levels"
        return f"{self.role.value}, {self.spec.bits}-bit level table ({shape}), mode={self.mode.value}"
