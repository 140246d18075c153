"""Quantized Linear / Conv2d that keep the original Parameters (state_dict keys do not change)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saq.quant.factory import make_quantizer
from saq.quant.quantizer import FakeQuantizer, QuantSpec, Role


def _adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A new ``cls`` instance sharing ``module``'s Parameters, buffers and children.

    The dicts are copied, the tensors are not, so the swap is reversible and the FP parameters are
    the very objects the quantized module trains or hardens.
    """
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return new


class QuantizedModule:
    """Mixin of every quantized module: knows its float class and how to go back to it."""

    float_cls: type[nn.Module]

    def to_float(self) -> nn.Module:
        fp = _adopt(self.float_cls, self)
        for name in [n for n, m in fp._modules.items() if isinstance(m, FakeQuantizer)]:
            del fp._modules[name]
        return fp

    def quantizers(self) -> dict[str, FakeQuantizer]:
        return {n: m for n, m in self._modules.items() if isinstance(m, FakeQuantizer)}


class _WeightedQuantModule(QuantizedModule):
    """Shared swap logic for modules with a weight and one input."""

    @classmethod
    def from_float(cls, module: nn.Module, weight: QuantSpec | None, act: QuantSpec | None):
        new = _adopt(cls, module)
        like = module.weight  # quantizers live on the module's device, in its dtype
        new.weight_quantizer = FakeQuantizer(weight, Role.WEIGHT, like) if weight is not None else None
        new.input_quantizer = make_quantizer(act, Role.ACTIVATION, like) if act is not None else None
        return new

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)


class QuantLinear(_WeightedQuantModule, nn.Linear):
    float_cls = nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(_WeightedQuantModule, nn.Conv2d):
    float_cls = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)
