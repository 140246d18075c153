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
                  fused: FusedKernel | None = None, keep_fp: torch.Tensor | None = None,
                  fused_backward: Callable | None = None) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding (gradients reach x and scale).

    Divides by the scale and rounds half to even, as ONNX QuantizeLinear does, so the fake-quantized
    model computes what an int8 runtime computes from the same scales and zero points. ``fused``: a
    compiled form of the arithmetic (:func:`fused_fake_quantize`) for float32 tensors. ``keep_fp``
    (QDrop): where True, x passes through unquantized, and so does its gradient; the same values and
    gradients as ``torch.where(keep_fp, x, fake_quantize(x))``, in one autograd node instead of two.
    ``fused_backward``: the compiled backward (:func:`fused_ste_backward`)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        return _fake_quantize_inference(x, scale.detach(), zero_point.detach(), qmin, qmax, fused, keep_fp)
    return _FakeQuantizeSTE.apply(x, scale, zero_point.detach(), qmin, qmax, fused, keep_fp, fused_backward)


def _fake_quantize_values(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                          keep_fp: torch.Tensor | None = None) -> torch.Tensor:
    """The arithmetic written out (what :func:`fused_fake_quantize` compiles into one kernel), with
    QDrop's selection of FP elements when ``keep_fp`` is given."""
    out = (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale
    return out if keep_fp is None else torch.where(keep_fp, x, out)


def fused_fake_quantize() -> FusedKernel:
    """``torch.compile`` of the fake-quantization arithmetic: one kernel instead of six passes over the
    tensor (about 3x faster on CPU), the same values bit for bit (tests/test_quant_functional.py). The
    first call of each tensor layout compiles (seconds); ``runtime.compile=true`` turns it on."""
    return torch.compile(_fake_quantize_values, dynamic=True)


def _ste_backward_values(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grad: torch.Tensor,
                         keep_fp: torch.Tensor | None, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight-through node's backward on (rows, N) tensors: the gradient of x and each element's
    share of the step's gradient (what :func:`fused_ste_backward` compiles into one pass; the eager
    backward of ``_FakeQuantizeSTE`` computes the same in place). The sum over elements stays outside:
    a compiled reduction would add in another order than the eager one."""
    scaled = x / scale
    rounded = torch.round(scaled)
    unrounded = scaled + zero_point
    inside = (unrounded >= qmin) & (unrounded <= qmax)
    local = torch.where(inside, rounded - scaled, torch.clamp(rounded + zero_point, qmin, qmax) - zero_point)
    if keep_fp is None:
        return grad * inside, grad * local
    # an element kept FP does not depend on the step: its term is 0 even where its gradient is not finite
    return grad * (inside | keep_fp), torch.where(keep_fp, torch.zeros_like(local), grad * local)


def fused_ste_backward() -> Callable:
    """``torch.compile`` of :func:`_ste_backward_values`: the training backward of fake quantization (the
    largest cost of a reconstruction step on CPU) in one pass instead of about fifteen. The gradients of x
    and of the step are the eager ones bit for bit: ``_fused_backward`` calls it only on layouts where the
    step's terms are summed in the eager order."""
    return torch.compile(_ste_backward_values, dynamic=True)


class _FakeQuantizeSTE(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` with LSQ's straight-through gradients. The
    forward keeps only x (autograd of the written-out ops would keep half a dozen temporaries of x's
    size) and the backward recomputes the codes.

    With v = x/s + z: d/dx = 1 where qmin <= v <= qmax, else 0; d/ds = round(x/s) - x/s there, else
    the clipped code minus z (qmin - z or qmax - z), summed to the scale's shape. Written out with
    round_ste, autograd gives the same except on codes at a bound, where float noise in
    (round(v) - v) + v decides."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, fused=None, keep_fp=None, fused_backward=None):
        ctx.save_for_backward(x, scale, zero_point, keep_fp)
        ctx.qmin, ctx.qmax, ctx.fused_backward = qmin, qmax, fused_backward
        return _not_a_view(_fake_quantize_inference(x, scale.detach(), zero_point, qmin, qmax, fused, keep_fp))

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, keep_fp = ctx.saved_tensors
        if ctx.fused_backward is not None:
            fused = _fused_backward(ctx, grad, x, scale, zero_point, keep_fp)
            if fused is not None:
                return (*fused, None, None, None, None, None, None)
        scaled = x / scale
        rounded = torch.round(scaled)
        codes = rounded + zero_point
        unrounded = scaled + zero_point  # LSQ decides "clipped" before rounding
        inside = (unrounded >= ctx.qmin) & (unrounded <= ctx.qmax)
        del unrounded
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * (inside if keep_fp is None else inside | keep_fp)  # an FP element passes its gradient
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # inside: (q - z) - x/s = round(x/s) - x/s; clamped: the bound's code minus z
            local = torch.where(inside, rounded.sub_(scaled), codes.clamp_(ctx.qmin, ctx.qmax).sub_(zero_point))
            terms = grad * local
            if keep_fp is not None:  # an element kept FP does not depend on the step, whatever its gradient
                terms.masked_fill_(keep_fp, 0.0)
            grad_scale = terms.sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None, None, None, None, None


def _not_a_view(out: torch.Tensor) -> torch.Tensor:
    """out, or where it is a view (the compiled kernel's result reshaped) a tensor of its own on the same
    memory: autograd forbids in-place ops on a view returned by a custom Function, and a copy would cost
    a pass over the tensor. Nothing else refers to the kernel's buffer once the forward returns."""
    if not out._is_view():
        return out
    return out.new_empty(0).set_(out.untyped_storage(), out.storage_offset(), out.shape, out.stride())


def _fused_backward(ctx, grad, x, scale, zero_point, keep_fp) -> tuple | None:
    """(grad_x, grad_scale) from the compiled kernel on the (rows, N) layout; None where the layout does
    not fit it (the eager backward then runs). x, its gradient and the mask are read in one memory order:
    where their layouts differ and the gradient is contiguous, contiguous copies of x and the mask (one pass
    each) instead of the eager backward's fifteen; the eager product then has the gradient's contiguous
    layout too, so the step's terms are summed in the same order. Any other mix of layouts runs eagerly."""
    if x.dtype != torch.float32 or scale.dtype != torch.float32 or grad.dtype != torch.float32:
        return None
    if grad.stride() != x.stride() or (keep_fp is not None and keep_fp.stride() != x.stride()):
        if not grad.is_contiguous():
            return None
        x = x.contiguous()
        keep_fp = keep_fp.contiguous() if keep_fp is not None else None
    rows = _as_rows(x, scale, zero_point)
    grad_flat = _flat(grad)
    keep_flat = _flat(keep_fp) if keep_fp is not None else None
    if rows is None or grad_flat is None or (keep_fp is not None and keep_flat is None):
        return None
    x_rows, scale_rows, zero_rows = rows
    grad_x, grad_scale_terms = ctx.fused_backward(x_rows, scale_rows, zero_rows, grad_flat.view(x_rows.shape),
                                            keep_flat.view(x_rows.shape) if keep_flat is not None else None,
                                            ctx.qmin, ctx.qmax)
    return (_unflat(grad_x.view(-1), x) if ctx.needs_input_grad[0] else None,
            _unflat(grad_scale_terms.view(-1), x).sum_to_size(scale.shape) if ctx.needs_input_grad[1] else None)


def _flat(x: torch.Tensor) -> torch.Tensor | None:
    """x's elements as a 1-D view of its storage when x is contiguous or a permutation of a contiguous
    tensor (SAM's image tokens are a permuted view), else None. Elementwise arithmetic on this view is
    arithmetic on x, element for element."""
    if x.is_contiguous():
        return x.view(-1)
    expected = 1  # dims by increasing stride must tile the storage: strides 1, n1, n1*n2, ...
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return None
        expected *= size
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def _unflat(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_flat` for a new contiguous ``flat``: a tensor laid out as ``like``."""
    return flat.view(like.shape) if like.is_contiguous() else flat.as_strided(like.shape, like.stride())


def _as_rows(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """(x, scale, zero point) as (rows, N), (rows, 1), (rows, 1): per tensor one row (of x in its memory
    order), per channel of the first axis (weights) one row per channel. Every quantizer then calls the
    compiled kernel with the same ranks and plain tensors, so it compiles twice in all instead of once per
    layout (and past dynamo's recompile limit). None (eager) for anything else: an overlapping or strided
    x, a non-contiguous per-channel x, another channel axis. :func:`_unflat` lays a result out as x."""
    if x.dim() == 0:
        return None
    x = x.detach()  # a Parameter would be a layout of its own; this path has no gradient anyway
    if scale.numel() == 1:
        flat = _flat(x)
        return None if flat is None else (flat.view(1, -1), scale.reshape(1, 1), zero_point.reshape(1, 1))
    channels = x.shape[0]
    if x.is_contiguous() and scale.numel() == channels and scale.dim() == x.dim() and scale.shape[0] == channels:
        return x.view(channels, -1), scale.reshape(channels, 1), zero_point.expand_as(scale).reshape(channels, 1)
    return None


def _fake_quantize_inference(x, scale, zero_point, qmin, qmax, fused: FusedKernel | None = None,
                             keep_fp: torch.Tensor | None = None) -> torch.Tensor:
    """The same arithmetic in place on one buffer: the same values as the differentiable path, bit for
    bit, and on CPU about 5x faster than torch's fused fake_quantize kernels (which also write a mask).
    ``keep_fp``: QDrop's FP elements (in the compiled kernel a select in the same pass; eagerly a
    torch.where, which on CPU costs as much as the quantization)."""
    if x.dtype != scale.dtype and x.dtype in (torch.float16, torch.bfloat16):
        out = _fake_quantize_inference(x.float(), scale, zero_point, qmin, qmax, fused).to(x.dtype)
        return out if keep_fp is None else torch.where(keep_fp, x, out)
    if fused is not None and x.dtype == torch.float32 and scale.dtype == torch.float32:
        rows = _as_rows(x, scale, zero_point)
        keep_flat = _flat(keep_fp) if keep_fp is not None and keep_fp.stride() == x.stride() else None
        if rows is not None and (keep_fp is None or keep_flat is not None):
            args = (*rows, qmin, qmax) if keep_fp is None else (*rows, qmin, qmax, keep_flat.view(rows[0].shape))
            return _unflat(fused(*args).view(-1), x)
    y = x / scale
    out = y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    return out if keep_fp is None else torch.where(keep_fp, x, out, out=out)
