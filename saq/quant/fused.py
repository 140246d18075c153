"""``runtime.compile``: compiled fake quantization for a whole model.

Each quantizer's inference arithmetic becomes one ``torch.compile``d kernel instead of a pass per
operation; the values are the eager ones bit for bit (tests/test_quant_functional.py,
tests/test_log_quantizer.py), so a compiled run reports the same numbers, sooner. The training backward
of the uniform quantizer (reconstruction) is compiled too, where it gives the eager gradients bit for
bit (elsewhere the eager backward runs), so a compiled reconstruction learns what an eager one learns.
The kernels live on
the quantizers (``q.fused``, ``q.fused_backward``), one per kind, shared by all quantizers of a model.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from saq.quant.functional import (_fake_quantize_values, _not_a_view, _ste_backward_values, fused_fake_quantize,
                                  fused_ste_backward)
from saq.quant.log_quantizer import LogSoftmaxQuantizer, _log_fake_quantize_values, fused_log_fake_quantize
from saq.quant.quantizer import FakeQuantizer, iter_quantizers

log = logging.getLogger(__name__)


class EagerFallback:
    """A compiled kernel that falls back to its eager function, with one warning, when compiling fails
    (e.g. no C++ compiler for inductor on this machine): the run goes on with the same values.

    Views are passed as tensors of their own on the same memory: dynamo guards a view on its base's
    layout too, and the many bases of one (rows, N) layout would each compile anew until its recompile
    limit, after which it runs the function uncompiled. (Every call is outside autograd: inference, or inside
    a custom Function's forward or backward, so the alias drops no gradient link.)"""

    def __init__(self, compiled: Callable, eager: Callable, name: str) -> None:
        self.compiled, self.eager, self.name = compiled, eager, name
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*(_not_a_view(a) if isinstance(a, torch.Tensor) else a for a in args))
            except Exception as exc:  # inductor/dynamo raise many types; any of them means "run eager"
                self.failed = True
                log.warning("runtime.compile: compiling %s failed (%s: %s); running it eagerly (same values)",
                            self.name, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return self.eager(*args)


def use_fused_kernels_(model: nn.Module, enabled: bool = True) -> int:
    """Give every quantizer of ``model`` its compiled kernel (``enabled``) or the eager path back;
    returns how many quantizers changed."""
    uniform = EagerFallback(fused_fake_quantize(), _fake_quantize_values, "the uniform fake quantizer") \
        if enabled else None
    uniform_backward = EagerFallback(fused_ste_backward(), _ste_backward_values,
                                     "the uniform fake quantizer's backward") if enabled else None
    log_kernel = EagerFallback(fused_log_fake_quantize(), _log_fake_quantize_values, "the log softmax quantizer") \
        if enabled else None
    count = 0
    for _, q in iter_quantizers(model):
        if isinstance(q, LogSoftmaxQuantizer):
            q.fused = log_kernel
        elif type(q).forward is FakeQuantizer.forward:  # another subclass with arithmetic of its own: eager
            q.fused, q.fused_backward = uniform, uniform_backward
        else:
            continue
        count += 1
    return count
