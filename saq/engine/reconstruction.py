"""One reconstruction unit as a LightningModule with manual optimisation.

The module owns no network: it holds the unit's trainable quantizer parameters (AdaRound alphas and
learnable activation steps, shared with the model) and a ``run`` callable into the model. A Fabric
runner drives ``training_step`` so step counters stay monotonic across units.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from saq.engine.losses import lp_loss
from saq.models.units import ReconUnit
from saq.nn.modules import QuantizedModule
from saq.ptq.capture import to_device
from saq.quant.adaround import BetaSchedule, rounding_regularizer
from saq.quant.quantizer import FakeQuantizer, Role


@dataclass(frozen=True)
class ReconSettings:
    iters: int = 20000
    weights: str = "adaround"  # adaround | nearest
    activations: str = "lsq"  # lsq | fixed
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    qdrop_prob: float = 0.0
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    p: float = 2.0
    keep_best: bool = True
    best_window: int = 50
    encoder_loss: str = "mse"  # mse | par (prompt-aware, stage units of a ViT)
    par_mse_weight: float = 0.0  # optional weight of the plain stage-output MSE next to PAR
    decoder_loss: str = "mse"  # mse | clm
    final_attn_iters: int | None = None  # iterations of the final token-to-image attention unit


MIN_STEP_FRACTION = 1e-3  # learned activation steps never fall below this fraction of their calibrated value


def _in_unit(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def unit_quantizers(model: nn.Module, unit: ReconUnit) -> list[tuple[str, FakeQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer) and _in_unit(n, unit.trains)]


def unit_weight_modules(model: nn.Module, unit: ReconUnit) -> list[tuple[str, QuantizedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule) and _in_unit(n, unit.trains)
            and getattr(m, "weight_quantizer", None) is not None]


def _mix(quantized: Any, fp: Any, prob: float) -> Any:
    """QDrop input mixing: each element comes from the FP input with probability ``prob``."""
    if isinstance(quantized, torch.Tensor) and quantized.is_floating_point():
        return torch.where(torch.rand_like(quantized) < prob, fp, quantized)
    if isinstance(quantized, (tuple, list)):
        return type(quantized)(_mix(q, f, prob) for q, f in zip(quantized, fp))
    if isinstance(quantized, dict):
        return {k: _mix(v, fp[k], prob) for k, v in quantized.items()}
    return quantized


class UnitReconstruction(L.LightningModule):
    def __init__(self, model: nn.Module, unit: ReconUnit, fp_inputs: list, q_inputs: list, targets: list,
                 settings: ReconSettings, head=None, head_targets: list | None = None) -> None:
        """``head`` (optional) maps the unit output of item i to the space the loss compares in (PAR);
        ``head_targets`` are the head's outputs for the FP targets."""
        super().__init__()
        self.head, self.head_targets = head, head_targets
        self.automatic_optimization = False
        self.unit, self.settings = unit, settings
        self.run_unit = functools.partial(unit.run, model)  # a callable, not a submodule: the model stays put
        self.fp_inputs, self.q_inputs, self.targets = fp_inputs, q_inputs, targets
        self.schedule = BetaSchedule(settings.iters, settings.beta_start, settings.beta_end, settings.warmup)
        self.quantizers = unit_quantizers(model, unit)
        alphas, scales = [], []
        if settings.weights == "adaround":
            for _, module in unit_weight_modules(model, unit):
                alphas.append(module.weight_quantizer.enable_soft_rounding(module.weight))
        for _, q in self.quantizers:
            if q.role is Role.ACTIVATION:
                if settings.activations == "lsq":
                    scales.append(q.make_scale_learnable())
                q.drop_prob = settings.qdrop_prob
                q.train()  # in-quantizer QDrop only acts in training mode
        self.alphas = nn.ParameterList(alphas)
        self.scales = nn.ParameterList(scales)
        # A learned step must stay positive: an Adam step larger than the step itself would flip its sign
        # and make the quantizer undeployable. Floor: a small fraction of the calibrated step.
        self.scale_floors = [s.detach().abs().clamp_min(torch.finfo(s.dtype).tiny) * MIN_STEP_FRACTION
                             for s in scales]
        self.device_ = next(iter(model.parameters())).device

    def make_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = []
        if len(self.alphas):
            optimizers.append(torch.optim.Adam(self.alphas, lr=self.settings.w_lr))
        if len(self.scales):
            optimizers.append(torch.optim.Adam(self.scales, lr=self.settings.a_lr))
        return optimizers

    def make_scheduler(self, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(self.settings.iters, 1), eta_min=0.0)

    def regularizer(self, step: int) -> tuple[torch.Tensor, float]:
        beta = self.schedule.beta(step)
        if not len(self.alphas) or not self.schedule.active(step):
            return torch.zeros((), device=self.device_), beta
        return self.settings.reg_weight * sum(rounding_regularizer(a, beta) for a in self.alphas), beta

    def training_step(self, step: int) -> dict[str, float]:
        i = int(torch.randint(len(self.q_inputs), (1,)))
        q_args, q_kwargs = to_device(self.q_inputs[i], self.device_)
        if self.settings.qdrop_prob > 0:
            fp_args, fp_kwargs = to_device(self.fp_inputs[i], self.device_)
            q_args = _mix(q_args, fp_args, self.settings.qdrop_prob)
            q_kwargs = _mix(q_kwargs, fp_kwargs, self.settings.qdrop_prob)
        out = self.run_unit(q_args, q_kwargs)
        target = to_device(self.targets[i], self.device_)
        if self.head is not None:
            rec = lp_loss(self.head(out, i), to_device(self.head_targets[i], self.device_), self.settings.p)
            if self.settings.par_mse_weight:
                rec = rec + self.settings.par_mse_weight * lp_loss(out, target, self.settings.p)
        else:
            rec = lp_loss(out, target, self.settings.p, self.unit.loss_weights)
        reg, beta = self.regularizer(step)
        loss = rec + reg
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        self.keep_steps_positive_()
        return {"loss": loss.item(), "rec": rec.item(), "reg": float(reg.detach()), "beta": beta}

    @torch.no_grad()
    def keep_steps_positive_(self) -> None:
        for scale, floor in zip(self.scales, self.scale_floors):
            torch.maximum(scale, floor, out=scale)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in [*self.alphas, *self.scales]]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        for p, v in zip([*self.alphas, *self.scales], values):
            p.copy_(v)

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> None:
        """Fix rounding, freeze steps, stop dropping; then prove it. FP weights stay untouched so later
        units' FP targets are those of the real FP model; the pipeline hardens weights at the end."""
        for _, module in unit_weight_modules(model, self.unit):
            module.weight_quantizer.fix_rounding_()
        for _, q in self.quantizers:
            q.freeze_scale()
            q.drop_prob = 0.0
            q.eval()
        leftovers = [n for n, q in self.quantizers if q.soft_rounding or q.drop_prob or q.scale_is_learnable or q.training]
        if leftovers:
            raise RuntimeError(f"unit {self.unit.name}: quantizers still soft/dropping/learnable: {leftovers[:5]}")
