"""Pure uniform-affine fake-quantization functions.

q = clamp(round(x / s) + z, qmin, qmax);  x^ = (q - z) * s.  The range always contains 0 so that
zero is exactly representable (padding, ReLU outputs, masked attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QParams:
    """Scale and zero point together with the integer range they refer to."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: unsigned [0, 2^b - 1] for asymmetric, signed for symmetric."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bit width must be in [2, 16], got {bits}")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool) -> QParams:
    """Scale/zero point that cover [min_val, max_val] extended to include 0."""
    qmin, qmax = int_range(bits, symmetric)
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = (amax / ((qmax - qmin) / 2)).clamp_min(MIN_SCALE)
        zero_point = torch.zeros_like(scale)
    else:
        scale = ((max_val - min_val) / (qmax - qmin)).clamp_min(MIN_SCALE)
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return QParams(scale, zero_point, qmin, qmax)


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as a float tensor) of x; no gradient path."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


FusedKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  fused: FusedKernel | None = None) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding (gradients reach x and scale).

    Divides by the scale and rounds half to even, as ONNX QuantizeLinear does, so the fake-quantized
    model computes what an int8 runtime computes from the same scales and zero points. ``fused``: a
    compiled form of the arithmetic (:func:`fused_fake_quantize`) for float32 tensors."""
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        return _fake_quantize_inference(x, scale.detach(), zero_point.detach(), qmin, qmax, fused)
    return _FakeQuantizeSTE.apply(x, scale, zero_point.detach(), qmin, qmax, fused)


def _fake_quantize_values(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                          ) -> torch.Tensor:
    """The arithmetic written out (what :func:`fused_fake_quantize` compiles into one kernel)."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fused_fake_quantize() -> FusedKernel:
    """``torch.compile`` of the fake-quantization arithmetic: one kernel instead of six passes over the
    tensor (about 3x faster on CPU), the same values bit for bit (tests/test_quant_functional.py). The
    first call of each tensor layout compiles (seconds); ``runtime.compile=true`` turns it on."""
    return torch.compile(_fake_quantize_values, dynamic=True)


class _FakeQuantizeSTE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with LSQ's straight-through gradients. The
    forward keeps only x (autograd of the written-out ops would keep half a dozen temporaries of x's
    size) and the backward recomputes the codes.

    With v = x/s + z: d/dx = 1 where qmin <= v <= qmax, else 0; d/ds = round(x/s) - x/s there, else
    the clipped code minus z (qmin - z or qmax - z), summed to the scale's shape. Written out with
    round_ste, autograd gives the same except on codes at a bound, where float noise in
    (round(v) - v) + v decides."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, fused=None):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qmin, ctx.qmax = qmin, qmax
        return _fake_quantize_inference(x, scale.detach(), zero_point, qmin, qmax, fused)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        scaled = x / scale
        rounded = torch.round(scaled)
        codes = rounded + zero_point
        unrounded = scaled + zero_point  # LSQ decides "clipped" before rounding
        inside = (unrounded >= ctx.qmin) & (unrounded <= ctx.qmax)
        del unrounded
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # inside: (q - z) - x/s = round(x/s) - x/s; clamped: the bound's code minus z
            local = torch.where(inside, rounded.sub_(scaled), codes.clamp_(ctx.qmin, ctx.qmax).sub_(zero_point))
            grad_scale = (grad * local).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None, None, None


def _as_rows(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """(x, scale, zero point) as (rows, N), (rows, 1), (rows, 1): per tensor one row, per channel of the
    first axis (weights) one row per channel. Every quantizer then calls the compiled kernel with the
    same ranks and plain tensors, so it compiles twice in all instead of once per layout (and past
    dynamo's recompile limit). None (eager) for anything else: a non-contiguous x, another channel axis."""
    if not x.is_contiguous() or x.dim() == 0:
        return None
    x = x.detach()  # a Parameter would be a layout of its own; this path has no gradient anyway
    if scale.numel() == 1:
        return x.view(1, -1), scale.reshape(1, 1), zero_point.reshape(1, 1)
    channels = x.shape[0]
    if scale.numel() == channels and scale.dim() == x.dim() and scale.shape[0] == channels:
        return x.view(channels, -1), scale.reshape(channels, 1), zero_point.expand_as(scale).reshape(channels, 1)
    return None


def _fake_quantize_inference(x, scale, zero_point, qmin, qmax, fused: FusedKernel | None = None) -> torch.Tensor:
    """The same arithmetic in place on one buffer: the same values as the differentiable path, bit for
    bit, and on CPU about 5x faster than torch's fused fake_quantize kernels (which also write a mask)."""
    if x.dtype != scale.dtype and x.dtype in (torch.float16, torch.bfloat16):
        return _fake_quantize_inference(x.float(), scale, zero_point, qmin, qmax, fused).to(x.dtype)
    if fused is not None and x.dtype == torch.float32 and scale.dtype == torch.float32:
        rows = _as_rows(x, scale, zero_point)
        if rows is not None:
            return fused(*rows, qmin, qmax).view(x.shape)
    y = x / scale
    return y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
