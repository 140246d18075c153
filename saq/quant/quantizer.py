"""FakeQuantizer: a quantization point with typed state.

Its mode (off / observe / quantize) and its role (weight / activation) are typed attributes that are
set through :func:`set_quant_mode` or :func:`quant_mode`, never selected by matching module names.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from saq.quant import adaround
from saq.quant.functional import compute_qparams, fake_quantize, int_range, quantize_to_int
from saq.quant.granularity import granularity_from_str
from saq.quant.observers import Observer, build_observer
from saq.quant.qdrop import keep_fp_mask


def tensor_kwargs(like: torch.Tensor | None) -> dict[str, Any]:
    """device/dtype of ``like`` for new qparams (defaults when absent or not floating point). Half
    precision modules keep float32 qparams: a 16-bit step size would move the grid itself."""
    if like is None or not like.is_floating_point():
        return {}
    return {"device": like.device, "dtype": like.dtype if like.element_size() >= 4 else torch.float32}


class QuantMode(enum.Enum):
    OFF = "off"  # identity: the FP model
    OBSERVE = "observe"  # identity, statistics go to the observer
    QUANTIZE = "quantize"  # fake-quantize with the stored scale / zero point


class Role(enum.Enum):
    WEIGHT = "weight"
    ACTIVATION = "activation"


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. ``granularity`` is 'tensor' or 'channel' (output channel)."""

    bits: int
    symmetric: bool = False
    granularity: str = "tensor"
    observer: str = "minmax"
    observer_kwargs: dict[str, Any] = field(default_factory=dict)
    quantizer: str = "uniform"  # uniform | log (post-softmax, see saq.quant.log_quantizer)

    def __post_init__(self) -> None:
        int_range(self.bits, self.symmetric)  # validates the bit width
        granularity_from_str(self.granularity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        return cls(**{**d, "observer_kwargs": dict(d.get("observer_kwargs") or {})})


class FakeQuantizer(nn.Module):
    """Uniform affine fake quantizer for one tensor (a weight or an activation)."""

    def __init__(self, spec: QuantSpec, role: Role, like: torch.Tensor | None = None) -> None:
        """``like``: a tensor of the wrapped module (its weight) whose device and dtype the qparams take,
        so a quantizer inserted into a model already on a GPU (or in float64) lives there too."""
        super().__init__()
        self.spec = spec
        self.role = role
        self.granularity = granularity_from_str(spec.granularity)
        self.qmin, self.qmax = int_range(spec.bits, spec.symmetric)
        # Empty until calibrated; resized on load so checkpoints restore any granularity.
        self.register_buffer("scale", torch.empty(0, **tensor_kwargs(like)))
        self.register_buffer("zero_point", torch.empty(0, **tensor_kwargs(like)))
        self.mode = QuantMode.OFF
        self.observer: Observer | None = None
        # Probability of passing the FP value through (QDrop). Only reconstruction may set it > 0;
        # deployment checks require 0.
        self.drop_prob = 0.0
        self.drop_draws = "bits"  # how the dropped elements are drawn (saq.quant.qdrop.keep_fp_mask)
        # Learned rounding (AdaRound, weights only): alpha exists only while rounding is soft.
        self.alpha: nn.Parameter | None = None
        # Fixed learned rounding (0/1 per weight) after a unit is done, until weights are hardened.
        self.register_buffer("rounding", None)
        # A compiled fake-quantization kernel (runtime.compile=true, saq.quant.fused), or None: eager.
        self.fused: Callable | None = None
        self.fused_backward: Callable | None = None  # its training backward (saq.quant.functional.fused_ste_backward)

    # state --------------------------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return self.scale.numel() > 0

    def set_mode(self, mode: QuantMode) -> None:
        if mode is QuantMode.OBSERVE and self.observer is None:
            self.observer = build_observer(self.spec.observer, self.spec.bits, self.spec.symmetric,
                                           self.granularity, **self.spec.observer_kwargs)
            self.observer.name = self.extra_repr()
        self.mode = mode

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Store qparams that cover [min_val, max_val] (shapes follow the granularity)."""
        qp = compute_qparams(min_val.detach().float(), max_val.detach().float(), self.spec.bits, self.spec.symmetric)
        # where the (empty) qparams already live: the wrapped module's device and dtype
        self.scale = qp.scale.to(device=self.scale.device, dtype=self.scale.dtype)
        self.zero_point = qp.zero_point.to(device=self.scale.device, dtype=self.scale.dtype)

    def finalize_observer(self) -> None:
        """Turn the observer's statistics into qparams and drop the observer."""
        if self.observer is None:
            raise RuntimeError(f"quantizer {self.extra_repr()} has no observer to finalize")
        self.set_range(*self.observer.compute_range())
        self.observer = None

    # learning (reconstruction) ----------------------------------------------------------------
    @property
    def soft_rounding(self) -> bool:
        return self.alpha is not None

    @property
    def scale_is_learnable(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def make_scale_learnable(self) -> nn.Parameter:
        """LSQ: the step becomes a Parameter (same state_dict key); the zero point stays fixed."""
        if not self.scale_is_learnable:
            value = self.scale.detach().clone()
            del self._buffers["scale"]
            self.scale = nn.Parameter(value)
        return self.scale

    def freeze_scale(self) -> None:
        """Back to a buffer: the learned step becomes a constant."""
        if self.scale_is_learnable:
            value = self.scale.detach().clone()
            del self._parameters["scale"]
            self.register_buffer("scale", value)

    def enable_soft_rounding(self, weight: torch.Tensor) -> nn.Parameter:
        """AdaRound on ``weight`` (this quantizer must already be calibrated on it)."""
        if self.role is not Role.WEIGHT:
            raise ValueError("AdaRound applies to weight quantizers only")
        self.alpha = nn.Parameter(adaround.init_alpha(weight.detach(), self.scale.detach()))
        return self.alpha

    @torch.no_grad()
    def fix_rounding_(self) -> None:
        """End of a unit: the learned rounding becomes a fixed 0/1 offset; the FP weight stays intact
        so later units still see the true FP model."""
        if self.alpha is not None:
            self.rounding = (adaround.rectified_sigmoid(self.alpha) >= 0.5).to(self.alpha.dtype)
            self.alpha = None

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight on its integer grid, with any learned rounding applied; afterwards nearest rounding
        of the returned value reproduces it, so learned-rounding state is dropped."""
        self.fix_rounding_()
        if self.rounding is None:
            return fake_quantize(weight, self.scale, self.zero_point, self.qmin, self.qmax)
        hard = adaround.fixed_quantize(weight, self.rounding, self.scale, self.zero_point, self.qmin, self.qmax)
        self.rounding = None
        return hard

    def deploy_problems(self) -> list[str]:
        problems = []
        if self.soft_rounding:
            problems.append("soft (AdaRound) rounding still on: weights were not hardened")
        return problems

    def _effective_scale(self, numel: int) -> torch.Tensor:
        if not self.scale_is_learnable:
            return self.scale
        g = adaround.lsq_grad_scale(numel // max(self.scale.numel(), 1), self.qmax)
        return (self.scale - self.scale * g).detach() + self.scale * g  # value s, gradient scaled by g

    def int_codes(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_to_int(x, self.scale, self.zero_point, self.qmin, self.qmax)

    # forward ------------------------------------------------------------------------------------
    def passthrough(self, x: torch.Tensor) -> bool:
        """True when this forward returns x unchanged (off, or observing: x goes to the observer); raises
        when asked to quantize without qparams."""
        if self.mode is QuantMode.OFF:
            return True
        if self.mode is QuantMode.OBSERVE:
            self.observer.update(x)
            return True
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer {self.extra_repr()} is in QUANTIZE mode but was never calibrated")
        return False

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``values``: the V an attention map is applied to (used by output-aware quantizers only)."""
        if self.passthrough(x):
            return x
        keep_fp = (keep_fp_mask(x, self.drop_prob, self.drop_draws)  # QDrop
                   if self.drop_prob > 0.0 and self.training else None)
        if self.alpha is not None:
            xq = adaround.soft_quantize(x, self.alpha, self.scale.detach(), self.zero_point, self.qmin, self.qmax)
        elif self.rounding is not None:
            xq = adaround.fixed_quantize(x, self.rounding, self.scale, self.zero_point, self.qmin, self.qmax)
        else:  # the common case: QDrop inside the straight-through node (one autograd node, not two)
            return fake_quantize(x, self._effective_scale(x.numel()), self.zero_point, self.qmin, self.qmax,
                                 self.fused, keep_fp, self.fused_backward)
        return xq if keep_fp is None else torch.where(keep_fp, x, xq)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # qparams are empty before calibration: take the checkpoint's shapes.
        # New tensors are made where this quantizer lives (its module's device and dtype), not the file's.
        if prefix + "rounding" in state_dict and self.rounding is None:
            self._buffers["rounding"] = torch.empty(state_dict[prefix + "rounding"].shape, device=self.scale.device,
                                                    dtype=self.scale.dtype)
        for name in ("scale", "zero_point"):
            key = prefix + name
            current = getattr(self, name)
            if key in state_dict and current.shape != state_dict[key].shape:
                resized = torch.empty(state_dict[key].shape, device=current.device, dtype=current.dtype)
                if isinstance(current, nn.Parameter):
                    self._parameters[name] = nn.Parameter(resized)
                else:
                    self._buffers[name] = resized
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        sym = "sym" if self.spec.symmetric else "asym"
        return f"{self.role.value}, {self.spec.bits}-bit {sym} per-{self.spec.granularity}, mode={self.mode.value}"


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            yield name, module


QuantizerFilter = Callable[[str, FakeQuantizer], bool]


def set_quant_mode(model: nn.Module, mode: QuantMode, where: QuantizerFilter | None = None) -> int:
    """Set the mode of every quantizer (or those ``where(name, q)`` accepts); returns the count."""
    count = 0
    for name, q in iter_quantizers(model):
        if where is None or where(name, q):
            q.set_mode(mode)
            count += 1
    return count


@contextlib.contextmanager
def quant_mode(model: nn.Module, mode: QuantMode, where: QuantizerFilter | None = None):
    """Temporarily set quantizer modes; the previous modes come back on exit."""
    previous = {name: q.mode for name, q in iter_quantizers(model)}
    set_quant_mode(model, mode, where)
    try:
        yield model
    finally:
        for name, q in iter_quantizers(model):
            q.mode = previous.get(name, q.mode)

