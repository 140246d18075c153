"""``runtime.compile``: compiled fake quantization for a whole model.

Each quantizer's inference arithmetic becomes one ``torch.compile``d kernel instead of a pass per
operation; the values are the eager ones bit for bit (tests/test_quant_functional.py,
tests/test_log_quantizer.py), so a compiled run reports the same numbers, sooner. The kernels live on
the quantizers (``q.fused``), one per kind, shared by all quantizers of a model.
"""

from __future__ import annotations

from torch import nn

from saq.quant.functional import fused_fake_quantize
from saq.quant.log_quantizer import LogSoftmaxQuantizer, fused_log_fake_quantize
from saq.quant.quantizer import FakeQuantizer, iter_quantizers


def use_fused_kernels_(model: nn.Module, enabled: bool = True) -> int:
    """Give every quantizer of ``model`` its compiled kernel (``enabled``) or the eager path back;
    returns how many quantizers changed."""
    uniform = fused_fake_quantize() if enabled else None
    log = fused_log_fake_quantize() if enabled else None
    count = 0
    for _, q in iter_quantizers(model):
        if isinstance(q, LogSoftmaxQuantizer):
            q.fused = log
        elif type(q).forward is FakeQuantizer.forward:  # another subclass with arithmetic of its own: eager
            q.fused = uniform
        else:
            continue
        count += 1
    return count
