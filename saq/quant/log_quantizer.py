"""PTQ4SAM's adaptive-granularity log quantizer (AGQ) for post-softmax attention maps.

Codes: q = round(-tau * log2(a / s)), clamped below at 0 (a > s saturates to s); codes >= 2^b mean
"exactly zero". Values: a^ = s * 2^(-q / tau). The representable set is therefore {0} plus 2^b
powers of 2^(1/tau) below s (2^b + 1 values, as in PTQ4SAM).

Calibration (docs/method.md section 2): for every observed forward and every tau, the scale s is searched
on a grid in [min(0.1, 0.01 max a), max a] minimising mean |(A^ - A) V|^p, the error AFTER the map is
applied to V (``max_maps``: estimated on a seeded sample of at most that many maps of the forward). Errors of each tau's best s are summed over forwards; the tau with the lowest total wins
and its per-forward best scales are averaged.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from saq.quant.functional import round_ste
from saq.quant.granularity import PerTensor
from saq.quant.observers import CalibrationDataError, Observer, all_finite
from saq.quant.qdrop import keep_fp_mask
from saq.quant.quantizer import FakeQuantizer, QuantMode, QuantSpec, Role, tensor_kwargs

DEFAULT_TAUS = (1.0, 2.0, 4.0)
DEFAULT_CHUNK_ELEMS = 2**24  # attention-map elements per search block (bounds the search's memory)


def _log_dequantize(log2_a: torch.Tensor, is_zero: torch.Tensor, log2_s: torch.Tensor, tau: torch.Tensor | float,
                    n_levels: int, rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """a^ from log2(a) (zeros flagged by ``is_zero``); gradients reach a (via ``rounding``) and s."""
    q = rounding(tau * (log2_s - log2_a)).clamp_min(0.0)  # a > s saturates at code 0 (= s)
    deq = torch.exp2(log2_s - q / tau)
    # The mask is built from detached codes, so masked entries get a zero (finite) gradient.
    return torch.where(is_zero | (q.detach() >= n_levels), torch.zeros_like(deq), deq)


def _log_fake_quantize_inference(x: torch.Tensor, log2_s: torch.Tensor, tau: torch.Tensor, n_levels: int) -> torch.Tensor:
    """``_log_dequantize`` without autograd, in place on one buffer: the same values bit for bit, about
    2.5x faster on CPU (the encoder's 196 x 196 window maps made the log quantizer 10x a softmax)."""
    y = x.clamp_min(torch.finfo(x.dtype).tiny)
    zero = x <= 0
    y.log2_().neg_().add_(log2_s).mul_(tau).round_().clamp_min_(0.0)  # q = round(tau * (log2 s - log2 a))
    zero |= y >= n_levels
    y.div_(tau).neg_().add_(log2_s).exp2_()  # s * 2^(-q / tau)
    return y.masked_fill_(zero, 0.0)


def _log_fake_quantize_values(x: torch.Tensor, log2_s: torch.Tensor, tau: torch.Tensor, n_levels: int) -> torch.Tensor:
    """The inference arithmetic written out (what :func:`fused_log_fake_quantize` compiles into one kernel)."""
    q = torch.round(tau * (log2_s - torch.log2(x.clamp_min(torch.finfo(x.dtype).tiny)))).clamp_min(0.0)
    deq = torch.exp2(log2_s - q / tau)
    return torch.where((x <= 0) | (q >= n_levels), torch.zeros_like(deq), deq)


def fused_log_fake_quantize() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``torch.compile`` of the log quantizer's inference arithmetic: one kernel over the attention map
    instead of eight passes (about 2.4x faster on CPU on 196 x 196 maps), the same values bit for bit."""
    return torch.compile(_log_fake_quantize_values, dynamic=True)


def _candidate_error_(buf: torch.Tensor, keep: torch.Tensor, neg_log2_a: torch.Tensor, a: torch.Tensor,
                      log2_s: torch.Tensor, tau: float, n_levels: int) -> torch.Tensor:
    """A^ - A for one search candidate, written into ``buf`` (``keep``: scratch): the values of
    ``_log_dequantize(..., torch.round) - a`` bit for bit, in place and without boolean masks (the search
    evaluates 150 candidates on every observed forward). ``neg_log2_a`` is -log2(a), +inf where a <= 0:
    such entries get code +inf and dequantize to exactly 0."""
    torch.add(neg_log2_a, log2_s, out=buf).mul_(tau).round_().clamp_min_(0.0)  # q = round(tau * (log2 s - log2 a))
    torch.sub(n_levels, buf, out=keep).clamp_(0.0, 1.0)  # 1 for codes below 2^b, else 0 (codes are integers)
    buf.div_(tau).neg_().add_(log2_s).exp2_().mul_(keep)  # s * 2^(-q / tau); codes >= 2^b are exactly 0
    return buf.sub_(a)


def _is_power_of_two(tau: float) -> bool:
    return math.frexp(tau)[0] == 0.5


def _candidate_error_pow2_(buf: torch.Tensor, tau_log2_a: torch.Tensor, a: torch.Tensor, log2_s: torch.Tensor,
                           tau: float, n_levels: int) -> torch.Tensor:
    """``_candidate_error_`` for a tau that is a power of two, the same values bit for bit in 7 passes
    instead of 12. ``tau_log2_a`` is tau * log2(a), -inf where a <= 0. Scaling by a power of two is exact,
    so tau * log2(a) - tau * log2(s) is exactly -tau * (log2(s) - log2(a)); rounding (half to even) is
    symmetric, so the buffer holds m = -q, the negated code; codes >= 2^b (m <= -2^b) become -inf, which
    exp2 takes to exactly 0; and s * 2^(-q / tau) = exp2(log2(s) + m / tau) with m / tau exact."""
    torch.sub(tau_log2_a, log2_s * tau, out=buf).round_().clamp_max_(0.0)
    torch.nn.functional.threshold_(buf, -float(n_levels), -math.inf)  # keeps m > -2^b, i.e. q < 2^b
    torch.add(log2_s, buf, alpha=1.0 / tau, out=buf).exp2_()
    return buf.sub_(a)


def _candidate_errors(buf: torch.Tensor, scratch: torch.Tensor, a: torch.Tensor, log2_a: torch.Tensor,
                      is_zero: torch.Tensor, log2_cands: torch.Tensor, tau: float, n_levels: int) -> Iterator[torch.Tensor]:
    """A^ - A for each candidate scale in turn, each written into ``buf`` (valid until the next one)."""
    if _is_power_of_two(tau):  # the default taus 1, 2, 4
        tau_log2_a = torch.mul(log2_a, tau, out=scratch).masked_fill_(is_zero, -math.inf)
        for log2_s in log2_cands:
            yield _candidate_error_pow2_(buf, tau_log2_a, a, log2_s, tau, n_levels)
    else:
        neg_log2_a = (-log2_a).masked_fill_(is_zero, math.inf)
        for log2_s in log2_cands:
            yield _candidate_error_(buf, scratch, neg_log2_a, a, log2_s, tau, n_levels)


def _lp_sum_(x: torch.Tensor, p: float) -> torch.Tensor:
    """sum(|x|^p), overwriting x: as exp2(p * log2|x|) (zeros: exp2(-inf) = 0), about 2.4x faster on CPU than
    torch's pow for a fractional p (the decoder's image-to-token maps spent most of their search in pow). Each
    term is within a few 1e-6 of pow's (relative), the sum within about 1e-7, far below the gaps between
    the search's candidates."""
    if p == 2.0:
        return x.square_().sum()
    return torch.log2(x.abs_(), out=x).mul_(p).exp2_().sum()


def _safe_log2(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2 of a clamped to the smallest normal float, mask of a <= 0): no inf/NaN for zeros."""
    tiny = torch.finfo(a.dtype).tiny
    return torch.log2(a.clamp_min(tiny)), a <= 0


def _blocks(batch: int, rows: int, cols: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """(map slice, row slice) blocks of a (batch, rows, cols) tensor with about ``budget`` elements each."""
    per_map = rows * cols
    if per_map <= budget:
        step = max(1, budget // per_map)
        for b in range(0, batch, step):
            yield slice(b, b + step), slice(None)
    else:
        step = max(1, budget // cols)
        for b in range(batch):
            for r in range(0, rows, step):
                yield slice(b, b + 1), slice(r, r + step)


class AGQObserver(Observer):
    """Per-forward scale search for every tau; the statistics of :class:`LogSoftmaxQuantizer`."""

    def __init__(self, bits: int, taus: Sequence[float] = DEFAULT_TAUS, grid: int = 50, p: float = 2.4,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS, max_maps: int | None = None) -> None:
        super().__init__(bits, symmetric=False, granularity=PerTensor())
        self.taus = tuple(float(t) for t in taus)
        if not self.taus or any(t <= 0 for t in self.taus):
            raise ValueError(f"AGQ taus must be positive numbers, got {taus!r}")
        if grid < 1 or chunk_elems < 1 or p <= 0:
            raise ValueError(f"AGQ needs grid >= 1, chunk_elems >= 1 and p > 0 (got {grid}, {chunk_elems}, {p})")
        self.grid, self.p, self.chunk_elems = int(grid), float(p), int(chunk_elems)
        if max_maps is not None and int(max_maps) < 1:
            raise ValueError(f"AGQ max_maps must be >= 1 or null, got {max_maps}")
        self.max_maps = None if max_maps is None else int(max_maps)
        self.n_levels = 2**bits
        self.total_error: torch.Tensor | None = None  # (T,) sum over forwards of each tau's best error
        self.best_scales: list[torch.Tensor] = []  # per forward: (T,) best s of each tau

    def update(self, x: torch.Tensor, values: torch.Tensor | None = None) -> None:
        if values is None:
            raise ValueError(f"log quantizer '{self.name}' observes a softmax map together with the V it "
                             "multiplies: call it as quantizer(attn, v)")
        x, values = x.detach(), values.detach()
        for what, t in (("attention map", x), ("values", values)):
            if not all_finite(t):
                raise CalibrationDataError(f"non-finite {what} reached quantizer '{self.name}' during calibration; "
                                           "check the calibration images and the FP checkpoint")
        self._search(x, values)
        self.num_updates += 1

    @torch.no_grad()
    def _search(self, attn: torch.Tensor, values: torch.Tensor) -> None:
        if attn.ndim < 2 or values.ndim != attn.ndim or values.shape[:-2] != attn.shape[:-2] \
                or values.shape[-2] != attn.shape[-1]:
            raise ValueError(f"quantizer '{self.name}': attention {tuple(attn.shape)} and values "
                             f"{tuple(values.shape)} do not match as (..., Nq, Nk) @ (..., Nk, C)")
        n_q, n_k, n_c = attn.shape[-2], attn.shape[-1], values.shape[-1]
        a = attn.reshape(-1, n_q, n_k).float()
        v = values.reshape(-1, n_k, n_c).float()
        amax = a.max().clamp_min(torch.finfo(a.dtype).tiny)
        lo = torch.minimum(0.01 * amax, torch.full_like(amax, 0.1))
        if self.max_maps is not None and a.shape[0] > self.max_maps:
            # The error is a mean over maps: a seeded sample of them estimates it at a fraction of the cost
            # (the candidate range still comes from the whole forward's maximum).
            keep = torch.randperm(a.shape[0], generator=torch.Generator().manual_seed(self.num_updates))
            keep = keep[: self.max_maps].to(a.device)
            a, v = a[keep], v[keep]
        cands = lo + (amax - lo) * torch.linspace(0.0, 1.0, self.grid, device=a.device)
        log2_cands = torch.log2(cands)
        sums = torch.zeros(len(self.taus), self.grid, device=a.device)
        for maps, rows in _blocks(a.shape[0], n_q, n_k, self.chunk_elems):
            a_blk, v_blk = a[maps, rows], v[maps]
            log2_a, is_zero = _safe_log2(a_blk)
            buf, scratch = torch.empty_like(a_blk), torch.empty_like(a_blk)
            out = a_blk.new_empty(a_blk.shape[:-1] + (n_c,))
            for ti, tau in enumerate(self.taus):
                # One candidate at a time: memory stays a few blocks, never grid x map; every pass writes
                # into the same buffers (fresh ones per candidate made this search about 2x slower on CPU).
                errors = _candidate_errors(buf, scratch, a_blk, log2_a, is_zero, log2_cands, tau, self.n_levels)
                blk = torch.stack([_lp_sum_(torch.bmm(error, v_blk, out=out), self.p) for error in errors])
                sums[ti] += blk
        err = sums / (a.shape[0] * n_q * n_c)
        best_err, best_idx = err.min(dim=1)
        self.best_scales.append(cands[best_idx])
        self.total_error = best_err if self.total_error is None else self.total_error + best_err

    def total_errors(self) -> dict[float, float]:
        """tau -> error summed over the observed forwards."""
        self._require_updates()
        return dict(zip(self.taus, self.total_error.tolist()))

    def best(self) -> tuple[float, float]:
        """(tau, scale): the tau with the lowest total error and the mean of its per-forward scales."""
        self._require_updates()
        ti = int(self.total_error.argmin())
        scale = torch.stack(self.best_scales)[:, ti].mean()
        return self.taus[ti], float(scale)

    def compute_range(self):
        raise NotImplementedError("AGQ yields (tau, scale), not a range: use best()")


class LogSoftmaxQuantizer(FakeQuantizer):
    """Log2 fake quantizer with adaptive base 2^(1/tau) for post-softmax maps (values in [0, 1])."""

    def __init__(self, spec: QuantSpec, role: Role, like: torch.Tensor | None = None) -> None:
        if spec.observer != "agq":
            raise ValueError(f"the log quantizer is calibrated by the AGQ search: use observer='agq' "
                             f"(got {spec.observer!r})")
        if spec.granularity != "tensor":
            raise ValueError(f"the log quantizer is per-tensor, got granularity={spec.granularity!r}")
        super().__init__(spec, role, like)
        self.qmin, self.qmax = 0, 2**spec.bits - 1  # log codes are unsigned; 2^b stands for exact zero
        self.n_levels = 2**spec.bits
        self.zero_point = torch.zeros((), **tensor_kwargs(like))  # unused; kept so generic checks see a finite value
        self.register_buffer("tau", torch.empty(0, **tensor_kwargs(like)))  # 0-dim once calibrated
        # False: inference runs the differentiable path too (same values; benchmarks time the difference)
        self.inference_path = True
        self.fused: Callable | None = None  # compiled inference kernel (runtime.compile, saq.quant.fused)

    # state --------------------------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return self.scale.numel() > 0 and self.tau.numel() > 0

    def set_mode(self, mode: QuantMode) -> None:
        if mode is QuantMode.OBSERVE and self.observer is None:
            self.observer = AGQObserver(self.spec.bits, **self.spec.observer_kwargs)
            self.observer.name = self.extra_repr()
        self.mode = mode

    def set_params(self, scale: float | torch.Tensor, tau: float | torch.Tensor) -> None:
        """Store a scale s > 0 and a tau > 0 (0-dim buffers on the quantizer's device)."""
        scale_t = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(())
        tau_t = torch.as_tensor(tau, dtype=torch.float32).detach().reshape(())
        if not (torch.isfinite(scale_t) and scale_t > 0 and torch.isfinite(tau_t) and tau_t > 0):
            raise ValueError(f"log quantizer needs finite positive scale and tau, "
                             f"got {float(scale_t)}, {float(tau_t)}")
        where = {"device": self.scale.device, "dtype": self.scale.dtype}  # the wrapped module's
        self.scale = scale_t.to(**where)
        self.tau = tau_t.to(**where)
        self.zero_point = torch.zeros((), **where)

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        raise TypeError("a log quantizer has no affine range: use set_params(scale, tau) or the AGQ observer")

    def finalize_observer(self) -> None:
        if self.observer is None:
            raise RuntimeError(f"quantizer {self.extra_repr()} has no observer to finalize")
        tau, scale = self.observer.best()
        self.set_params(scale, tau)
        self.observer = None

    def levels(self) -> torch.Tensor:
        """Every representable value, ascending: 0 and s * 2^(-q / tau) for q = 0 .. 2^b - 1."""
        self._require_calibrated()
        q = torch.arange(self.n_levels - 1, -1, -1, device=self.scale.device, dtype=self.scale.dtype)
        powers = torch.exp2(torch.log2(self.scale) - q / self.tau)
        return torch.cat([torch.zeros(1, device=q.device, dtype=q.dtype), powers])

    def int_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes as floats: 0 .. 2^b - 1, and 2^b for values quantized to exactly zero."""
        self._require_calibrated()
        log2_a, is_zero = _safe_log2(x.detach().float())
        q = torch.round(self.tau * (torch.log2(self.scale) - log2_a)).clamp(0, self.n_levels)
        return torch.where(is_zero, torch.full_like(q, self.n_levels), q)

    def deploy_problems(self) -> list[str]:
        """Extra checks for saq.nn.deploy: tau must be set, finite and positive."""
        if self.tau.numel() == 0:
            return ["log quantizer tau was never set"]
        if not (torch.isfinite(self.tau).all() and (self.tau > 0).all()):
            return ["log quantizer tau is non-finite or non-positive"]
        return []

    def _require_calibrated(self) -> None:
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer {self.extra_repr()} was never calibrated")

    # forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: a softmax map (..., Nq, Nk); ``values``: the V it multiplies (needed to observe)."""
        if self.mode is QuantMode.OFF:
            return x
        if self.mode is QuantMode.OBSERVE:
            self.observer.update(x, values)
            return x
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer {self.extra_repr()} is in QUANTIZE mode but was never calibrated")
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # log2 of tiny maps in half is lossy
        dropping = self.drop_prob > 0.0 and self.training
        if self.inference_path and not dropping and \
                not (torch.is_grad_enabled() and (xf.requires_grad or self.scale.requires_grad)):
            if self.fused is not None and xf.dtype == torch.float32 and xf.is_contiguous():
                # one flat layout for every map, so the kernel compiles once
                flat = self.fused(xf.detach().view(-1), torch.log2(self.scale), self.tau, self.n_levels)
                return flat.view(x.shape).to(x.dtype)
            return _log_fake_quantize_inference(xf, torch.log2(self.scale), self.tau, self.n_levels).to(x.dtype)
        log2_a, is_zero = _safe_log2(xf)
        xq = _log_dequantize(log2_a, is_zero, torch.log2(self.scale), self.tau, self.n_levels, round_ste).to(x.dtype)
        if self.drop_prob > 0.0 and self.training:
            keep_fp = keep_fp_mask(x, self.drop_prob, self.drop_draws)
            xq = torch.where(keep_fp, x, xq)
        return xq

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # tau is empty before calibration, like scale: take the checkpoint's shape.
        key = prefix + "tau"
        if key in state_dict:
            self.tau = torch.empty(state_dict[key].shape, device=self.tau.device, dtype=self.tau.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        tau = f"{float(self.tau):g}" if self.tau.numel() else "unset"
        return f"{self.role.value}, log2 {self.spec.bits}-bit, tau={tau}, mode={self.mode.value}"
