"""The honesty gate: a model is evaluated as quantized only if it really is.

``assert_deployable`` fails unless every quantizer is in QUANTIZE mode with finite qparams, none
drops to FP at random (QDrop), every quantized weight already lies on its integer grid, and no
module is in training mode.
"""

from __future__ import annotations

import torch
from torch import nn

from saq.nn.modules import QuantizedModule
from saq.quant.quantizer import FakeQuantizer, QuantMode, iter_quantizers
from saq.utils.errors import SaqUserError

GRID_TOLERANCE = 1e-3  # in units of one quantization step


class NotDeployableError(SaqUserError, RuntimeError):
    """The model is not in the state it claims to be evaluated in."""


def _quantizer_problems(name: str, q: FakeQuantizer) -> list[str]:
    problems = []
    if q.mode is not QuantMode.QUANTIZE:
        problems.append(f"{name}: mode is {q.mode.value}, expected quantize")
    if not q.is_calibrated:
        problems.append(f"{name}: never calibrated")
    elif not (torch.isfinite(q.scale).all() and (q.scale > 0).all() and torch.isfinite(q.zero_point).all()):
        problems.append(f"{name}: non-finite or non-positive scale / zero point")
    if q.drop_prob != 0.0:
        problems.append(f"{name}: QDrop probability {q.drop_prob} (evaluation must be deterministic)")
    extra = getattr(q, "deploy_problems", None)
    if callable(extra):
        problems.extend(f"{name}: {p}" for p in extra())
    return problems


@torch.no_grad()
def _weight_grid_problem(name: str, module: QuantizedModule) -> str | None:
    q = module.weight_quantizer
    if q is None or not q.is_calibrated or not torch.isfinite(module.weight).all():
        return None  # non-finite weights are reported by name by _non_finite_tensors
    codes = module.weight / q.scale + q.zero_point
    off_grid = (codes - codes.round()).abs().max().item()
    if off_grid > GRID_TOLERANCE:
        return f"{name}.weight: {off_grid:.3g} steps off its integer grid (weights not hardened)"
    if codes.min().item() < q.qmin - GRID_TOLERANCE or codes.max().item() > q.qmax + GRID_TOLERANCE:
        return f"{name}.weight: codes outside [{q.qmin}, {q.qmax}]"
    return None


@torch.no_grad()
def _non_finite_tensors(model: nn.Module) -> list[str]:
    """Every float parameter or buffer holding NaN or inf, by name (the grid check cannot see them:
    NaN compares false with any tolerance)."""
    problems = []
    for module_name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            continue  # its qparams have their own check (_quantizer_problems)
        for kind, tensors in (("parameter", module.named_parameters(recurse=False)),
                              ("buffer", module.named_buffers(recurse=False))):
            for name, t in tensors:
                if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
                    bad = int((~torch.isfinite(t)).sum())
                    full = f"{module_name}.{name}" if module_name else name
                    problems.append(f"{full}: {bad} NaN or inf values in this {kind}")
    return problems


def deployment_problems(model: nn.Module) -> list[str]:
    problems: list[str] = _non_finite_tensors(model)
    for name, q in iter_quantizers(model):
        problems.extend(_quantizer_problems(name, q))
    for name, module in model.named_modules():
        if isinstance(module, QuantizedModule) and getattr(module, "weight_quantizer", None) is not None:
            problem = _weight_grid_problem(name, module)
            if problem:
                problems.append(problem)
        if module.training:
            problems.append(f"{name or 'model'}: in training mode")
    return problems


def deployment_check(model: nn.Module, require_quantizers: bool = True) -> tuple[int, list[str]]:
    """(number of quantizers, every problem found): what metrics.json records as ``deployable``."""
    count = sum(1 for _ in iter_quantizers(model))
    problems = deployment_problems(model)
    if require_quantizers and count == 0:
        problems.insert(0, "model has no quantizers (was quantize_ applied?)")
    return count, problems


def assert_deployable(model: nn.Module, require_quantizers: bool = True) -> int:
    """Raise NotDeployableError listing what is wrong; returns the number of quantizers checked."""
    count, problems = deployment_check(model, require_quantizers)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise NotDeployableError(f"model is not deployable ({len(problems)} problems):\n  {shown}{more}")
    return count
