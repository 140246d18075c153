"""Export-time stand-ins for the fake quantizers: ONNX QuantizeLinear / DequantizeLinear with the
checkpoint's own scales and zero points.

``to_qdq_(model)`` swaps, in place, every quantized Linear / Conv2d for a module that holds its weight
as integer codes (DequantizeLinear with the per-channel scales) and every activation quantizer that
standard QDQ can express for a QuantizeLinear + DequantizeLinear pair. What QDQ cannot express stays
floating point and is reported, never silently dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from saq.nn.modules import QuantConv2d, QuantLinear
from saq.quant.log_quantizer import LogSoftmaxQuantizer
from saq.quant.table_quantizer import LevelTableQuantizer
from saq.quant.granularity import PerChannel
from saq.quant.quantizer import FakeQuantizer, QuantMode, Role, iter_quantizers
from saq.utils.errors import SaqUserError

GRID_TOLERANCE = 1e-3  # steps: a weight further from its grid was not hardened
UINT8 = (0, 255)
INT8 = (-128, 127)


@dataclass(frozen=True)
class PointReport:
    """What became of one quantization point in the exported graph."""

    name: str
    role: str  # weight | activation
    bits: int
    exported_as: str  # qdq_uint8 | qdq_int8 | fp
    note: str = ""
    max_abs_code: int | None = None  # int8-stored weights: the largest |code| (what int8 kernels multiply)

    def to_dict(self) -> dict:
        return asdict(self)


class ExportError(SaqUserError, RuntimeError):
    """The model cannot be exported as asked (not hardened, not calibrated, ...)."""


class _DequantizeWeight(torch.autograd.Function):
    """Integer weight codes -> float; exported as one DequantizeLinear on an integer initializer."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):
        shape = [1] * codes.ndim
        shape[axis] = -1 if scale.ndim else 1
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


def _integer_range(qmin: int, qmax: int) -> tuple[int, int, int]:
    """(offset, low, high): codes + offset fit an 8-bit type whose range is [low, high]."""
    if qmin >= 0 and qmax <= 255:
        return 0, *UINT8
    if qmin >= -128 and qmax <= 127:
        return 0, *INT8
    raise ExportError(f"integer range [{qmin}, {qmax}] does not fit 8 bits")


class ActivationQDQ(nn.Module):
    """QuantizeLinear + DequantizeLinear per tensor (exported from torch's fused fake-quant op).

    Codes narrower than 8 bits are kept exact by clipping x to the quantizer's range first: with the
    same scale and zero point an 8-bit Q then never leaves [qmin, qmax].
    """

    def __init__(self, q: FakeQuantizer) -> None:
        super().__init__()
        self.scale = float(q.scale.reshape(()))
        self.zero_point = int(round(float(q.zero_point.reshape(()))))
        self.low, self.high = (0, 255) if q.qmin >= 0 else INT8
        narrow = (q.qmin, q.qmax) != (self.low, self.high)
        self.clip = ((q.qmin - self.zero_point) * self.scale, (q.qmax - self.zero_point) * self.scale) if narrow else None

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        if self.clip is not None:
            x = x.clamp(*self.clip)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.low, self.high)


WEIGHT_LAYOUTS = ("symmetric", "int8", "uint8")


class _QDQWeighted(nn.Module):
    """Shared by the exported Linear / Conv2d: integer weight codes + per-output-channel qparams.

    ``weight_layout`` (the dequantized weights are the checkpoint's in all three):
    - ``symmetric``: Linear weights: asymmetric b-bit codes q become q - 2^(b-1) (int8, zero point 0 in
      the graph); the remainder s (2^(b-1) - z) per output channel is added exactly as that constant
      times the sum of the layer's input. OpenVINO runs int8 kernels only for weights without zero
      points; this keeps the recipe's asymmetric grid and still gets them. The input sums come from an
      int8 MatMul with all-ones weights. Conv weights: as ``int8``.
    - ``int8``: codes and zero points shifted by -128 (int8 with per-channel zero points).
    - ``uint8``: codes and zero points as stored (a signed b-bit grid shifted by 2^(b-1)).
    """

    def _init_weight(self, module: nn.Module, name: str, layout: str, axis: int, transpose: bool) -> None:
        if layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"unknown weight layout {layout!r}: choose one of {', '.join(WEIGHT_LAYOUTS)}")
        q = module.weight_quantizer
        weight = module.weight.detach()
        codes = q.int_codes(weight)
        off_grid = ((weight / q.scale + q.zero_point) - codes).abs().max().item()
        if off_grid > GRID_TOLERANCE:
            raise ExportError(f"{name}.weight is {off_grid:.3g} steps off its integer grid: only hardened checkpoints "
                              "(written by saq.ptq) export exactly")
        zero_point = q.zero_point.detach().round().reshape(-1)
        scale = q.scale.detach().float().reshape(-1)
        shift, low, _ = _integer_range(q.qmin, q.qmax)
        fold = layout == "symmetric" and bool((zero_point != 0).any())
        if low == 0 and layout != "uint8":  # unsigned grid: shift into int8
            shift = -(2 ** (q.spec.bits - 1)) if layout == "symmetric" else -128
        elif low < 0 and layout == "uint8":  # signed grid: shift into uint8 (u8 x u8 kernels are exact everywhere)
            shift = 2 ** (q.spec.bits - 1)
        codes, zero_point = codes + shift, zero_point + shift
        # Folded zero points: W = s (codes - zp) = s codes + s (-zp), the second part as a correction term.
        self.register_buffer("zero_point_offset", (-zero_point * scale) if fold else None)
        if fold:
            zero_point = torch.zeros_like(zero_point)
        dtype = torch.uint8 if codes.min() >= 0 and layout == "uint8" else torch.int8
        if transpose:
            codes = codes.t()
        self.register_buffer("codes", codes.contiguous().to(torch.int16).to(dtype))
        shape = () if scale.numel() == 1 else (-1,)  # a 0-d scale: DequantizeLinear ignores the axis
        self.register_buffer("scale", scale.reshape(shape).clone())
        self.register_buffer("zero_point", zero_point.to(torch.int16).to(dtype).reshape(shape))
        self.axis = axis
        self.exported_as = f"qdq_{'uint8' if dtype == torch.uint8 else 'int8'}" + ("_zero_point_folded" if fold else "")
        self.max_abs_code = int(codes.abs().max()) if dtype == torch.int8 else None

    def dequantized_weight(self) -> torch.Tensor:
        codes = self._buffers.get("codes", self._buffers.get(PACKED_4BIT_SUFFIX))
        return _DequantizeWeight.apply(codes, self.scale, self.zero_point, self.axis)

    def _init_ones(self, shape: tuple[int, ...]) -> None:
        """All-ones int8 weights (scale 1): the op applied with them sums its input (zero-point folding)."""
        self.register_buffer("ones_codes", torch.ones(shape, dtype=torch.int8) if self.zero_point_offset is not None else None)
        self.register_buffer("ones_scale", torch.tensor(1.0))
        self.register_buffer("ones_zero_point", torch.tensor(0, dtype=torch.int8))

    def ones(self) -> torch.Tensor:
        return _DequantizeWeight.apply(self.ones_codes, self.ones_scale, self.ones_zero_point, 0)


PACKED_4BIT_SUFFIX = "codes_4bit"  # weights the ONNX post-processing stores as 4-bit blocks (saq.export.onnx)
BLOCK_SIZES = (128, 64, 32, 16)  # DequantizeLinear block sizes runtimes fuse into 4-bit MatMul kernels


def packable_block_size(module: QuantLinear) -> int | None:
    """Block size along K for 4-bit storage of this Linear's weight, None when it cannot be packed."""
    q = module.weight_quantizer
    if q is None or q.spec.bits > 4 or q.granularity != PerChannel(0):
        return None
    return next((b for b in BLOCK_SIZES if module.in_features % b == 0), None)


class QDQLinear(_QDQWeighted):
    """x @ W^T + b with W stored transposed (in x out, scales on axis 1): the MatMul layout, so no
    Transpose sits between DequantizeLinear and MatMul in the graph.

    ``pack_4bit``: weights of <= 4 bits keep their stored codes and zero points (no folding), under a
    buffer name that tells the ONNX post-processing to store them as 4-bit blocks."""

    def __init__(self, module: QuantLinear, name: str, layout: str, pack_4bit: bool = False) -> None:
        super().__init__()
        block = packable_block_size(module) if pack_4bit else None
        self._init_weight(module, name, "uint8" if block else layout, axis=1, transpose=True)
        self._init_ones((module.in_features, 1))
        if block:
            self.register_buffer(PACKED_4BIT_SUFFIX, self._buffers.pop("codes"))
            self.exported_as = f"qdq_{'uint4' if self.codes_4bit.dtype == torch.uint8 else 'int4'}_block{block}"
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        self.input_qdq = _activation_stand_in(module.input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_qdq(x)
        y = torch.matmul(x, self.dequantized_weight())
        if self.zero_point_offset is not None:
            # The input sums as an int8 MatMul with all-ones weights: with ReduceSum instead, OpenVINO
            # 2026.4 computed a wrong vit_t embedding (relative error 1.2).
            y = y + torch.matmul(x, self.ones()) * self.zero_point_offset
        return y if self.bias is None else y + self.bias


class QDQConv2d(_QDQWeighted):
    def __init__(self, module: QuantConv2d, name: str, layout: str) -> None:
        super().__init__()
        # Conv weights keep their zero points (int8 layout): folding them (input sums over each receptive
        # field, as a sum pool or an all-ones conv) gave correct single convs but a wrong vit_t embedding
        # under OpenVINO 2026.4 (relative error 0.95-2.2 against 0.024 for the int8 layout).
        self._init_weight(module, name, "int8" if layout == "symmetric" else layout, axis=0, transpose=False)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        self.input_qdq = _activation_stand_in(module.input_quantizer)
        self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        if module.padding_mode != "zeros":
            raise ExportError(f"conv padding_mode {module.padding_mode!r} is not exported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_qdq(x)
        y = F.conv2d(x, self.dequantized_weight(), self.bias, **self.conv_args)
        return y


class KeptFloat(nn.Module):
    """Identity: a quantization point the export keeps in floating point (listed in export.json)."""

    def forward(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        return x


def _activation_stand_in(q: FakeQuantizer | None) -> nn.Module:
    if q is None or not qdq_expressible(q)[0]:
        return KeptFloat()
    return ActivationQDQ(q)


def qdq_expressible(q: FakeQuantizer) -> tuple[bool, str]:
    """(whether standard 8-bit QDQ reproduces this quantizer exactly, why not)."""
    if isinstance(q, LogSoftmaxQuantizer):
        return False, "log2 quantizer (AGQ): its levels are powers of 2^(1/tau), not a uniform grid"
    if isinstance(q, LevelTableQuantizer):
        return False, "level-table quantizer (post-GELU): its levels are a calibrated table, not a uniform grid"
    if q.spec.bits > 8:
        return False, f"{q.spec.bits}-bit codes do not fit an 8-bit QDQ type"
    if q.role is Role.ACTIVATION and q.scale.numel() != 1:
        return False, "per-channel activation scales are not exported"
    if q.role is Role.WEIGHT and q.granularity != PerChannel(0) and q.scale.numel() != 1:
        return False, "weight scales along an axis other than the output channel are not exported"
    return True, ""


def _report(name: str, q: FakeQuantizer, exported_as: str | None = None, max_abs_code: int | None = None) -> PointReport:
    ok, why = qdq_expressible(q)
    if exported_as is None:
        exported_as = ("qdq_uint8" if q.qmin >= 0 else "qdq_int8") if ok else "fp"
    note = why if not ok else (f"{q.spec.bits}-bit codes in an 8-bit type, range clipped to "
                               f"[{q.qmin}, {q.qmax}]" if q.spec.bits < 8 else "")
    return PointReport(name, q.role.value, q.spec.bits, exported_as, note, max_abs_code)


def _check_ready(model: nn.Module) -> None:
    for name, q in iter_quantizers(model):
        if q.mode is not QuantMode.QUANTIZE or not q.is_calibrated or q.drop_prob:
            raise ExportError(f"quantizer {name} is not a calibrated, deterministic QUANTIZE-mode quantizer "
                              f"(mode={q.mode.value}); export a checkpoint written by saq.ptq")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def to_qdq_(model: nn.Module, weight_layout: str = "symmetric", pack_4bit: bool = True) -> list[PointReport]:
    """Replace fake quantization by QDQ stand-ins in place; one report per quantization point.
    ``pack_4bit``: Linear weights of <= 4 bits are marked for 4-bit block storage (see QDQLinear)."""
    _check_ready(model)
    reports: list[PointReport] = []
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    for name, module in weighted:
        if module.weight_quantizer is None or not qdq_expressible(module.weight_quantizer)[0]:
            # weight-only-FP modules: keep the FP class, its input quantizer becomes a stand-in
            fp = module.to_float()
            if module.weight_quantizer is not None:
                reports.append(_report(f"{name}.weight_quantizer", module.weight_quantizer))
            if module.input_quantizer is not None:
                reports.append(_report(f"{name}.input_quantizer", module.input_quantizer))
                fp = nn.Sequential(_activation_stand_in(module.input_quantizer), fp)
            _set_submodule(model, name, fp)
            continue
        if isinstance(module, QuantLinear):
            new = QDQLinear(module, name, weight_layout, pack_4bit)
        else:
            new = QDQConv2d(module, name, weight_layout)
        reports.append(_report(f"{name}.weight_quantizer", module.weight_quantizer, new.exported_as, new.max_abs_code))
        if module.input_quantizer is not None:
            reports.append(_report(f"{name}.input_quantizer", module.input_quantizer))
        _set_submodule(model, name, new)
    for name, q in list(iter_quantizers(model)):  # the attention points left
        reports.append(_report(name, q))
        _set_submodule(model, name, _activation_stand_in(q))
    return reports


def strip_quantizers_(model: nn.Module) -> nn.Module:
    """Every quantizer becomes an identity (the FP graph of the same weights)."""
    for name, _ in list(iter_quantizers(model)):
        _set_submodule(model, name, KeptFloat())
    return model
