"""The quantizer a spec asks for: one typed registry (uniform, log or level table), above both quantizer modules."""

from __future__ import annotations

import torch

from saq.config.schema import QuantizerKind
from saq.quant.log_quantizer import LogSoftmaxQuantizer
from saq.quant.quantizer import FakeQuantizer, QuantSpec, Role
from saq.quant.table_quantizer import LevelTableQuantizer

QUANTIZERS: dict[QuantizerKind, type[FakeQuantizer]] = {
    QuantizerKind.uniform: FakeQuantizer,
    QuantizerKind.log: LogSoftmaxQuantizer,
    QuantizerKind.table: LevelTableQuantizer,
}


def make_quantizer(spec: QuantSpec, role: Role, like: torch.Tensor | None = None) -> FakeQuantizer:
    """``like``: a tensor of the wrapped module; the quantizer's qparams take its device and dtype."""
    try:
        kind = QuantizerKind(spec.quantizer)
    except ValueError:
        raise ValueError(f"unknown quantizer type {spec.quantizer!r}: choose one of "
                         f"{[k.value for k in QuantizerKind]}") from None
    return QUANTIZERS[kind](spec, role, like)
