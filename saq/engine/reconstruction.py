"""One reconstruction unit as a LightningModule, trained by a Lightning ``Trainer``.

The module owns no network: it holds the unit's trainable quantizer parameters (AdaRound alphas and
learnable activation steps, shared with the model) and a ``run`` callable into the model. The Trainer
owns the loop: device placement of the cached batches, precision, the optimiser and scheduler steps
(through ``training_step``), logging (``self.log`` -> the run's loggers) and the per-unit callbacks
(best window, loss curve, checkpoint) in ``saq.engine.callbacks``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from saq.config.schema import ActivationStep, ReconConfig, WeightRounding, typed_node
from saq.engine.losses import lp_loss
from saq.models.units import ReconUnit
from saq.nn.modules import QuantizedModule
from saq.quant.adaround import BetaSchedule, rounding_regularizer
from saq.quant.qdrop import keep_fp_mask
from saq.quant.quantizer import FakeQuantizer, Role


def recon_settings(cfg: Mapping[str, Any]) -> ReconConfig:
    """The typed ``ptq.recon`` node the loop reads (schema defaults for keys it lacks); a value outside
    its choices raises with the choices listed."""
    return typed_node(ReconConfig, cfg, "ptq.recon")


MIN_STEP_FRACTION = 1e-3  # learned activation steps never fall below this fraction of their calibrated value


def _in_unit(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def unit_quantizers(model: nn.Module, unit: ReconUnit) -> list[tuple[str, FakeQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantizer) and _in_unit(n, unit.trains)]


def unit_weight_modules(model: nn.Module, unit: ReconUnit) -> list[tuple[str, QuantizedModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedModule) and _in_unit(n, unit.trains)
            and getattr(m, "weight_quantizer", None) is not None]


def _mix(quantized: Any, fp: Any, prob: float, draws: str) -> Any:
    """QDrop input mixing: each element comes from the FP input with probability ``prob``."""
    if isinstance(quantized, torch.Tensor) and quantized.is_floating_point():
        return torch.where(keep_fp_mask(quantized, prob, draws), fp, quantized)
    if isinstance(quantized, (tuple, list)):
        return type(quantized)(_mix(q, f, prob, draws) for q, f in zip(quantized, fp))
    if isinstance(quantized, dict):
        return {k: _mix(v, fp[k], prob, draws) for k, v in quantized.items()}
    return quantized


def _as_float32(value: Any) -> Any:
    """Cached tensors may be stored in half precision; the unit computes in float32."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.promote_types(value.dtype, torch.float32)) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_as_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    return value


class UnitBatches(Dataset):
    """Item i of a unit's cache: its quantized input, FP input (for QDrop), target and PAR head target.
    The Trainer moves each batch to the model's device."""

    def __init__(self, q_inputs: list, fp_inputs: list | None, targets: list, head_targets: list | None) -> None:
        self.q_inputs, self.fp_inputs, self.targets, self.head_targets = q_inputs, fp_inputs, targets, head_targets

    def __len__(self) -> int:
        return len(self.q_inputs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "q": self.q_inputs[i], "fp": self.fp_inputs[i] if self.fp_inputs is not None else None,
                "target": self.targets[i],
                "head_target": self.head_targets[i] if self.head_targets is not None else None}


class UnitReconstruction(L.LightningModule):
    def __init__(self, model: nn.Module, unit: ReconUnit, settings: ReconConfig,
                 head: Callable[[Any, int], Any] | None = None) -> None:
        """``head`` (optional) maps the unit output of item i to the space the loss compares in (PAR)."""
        super().__init__()
        self.automatic_optimization = False  # two optimisers (alphas, steps), one backward per step
        self.unit, self.settings = unit, settings
        self.run_unit = functools.partial(unit.run, model)  # a callable, not a submodule: the model stays put
        self.head = head  # a plain callable (not a submodule): the Trainer's train()/to() leave the FP parts alone
        self.schedule = BetaSchedule(settings.iters, settings.beta_start, settings.beta_end, settings.warmup)
        self.quantizers = unit_quantizers(model, unit)
        self.weight_modules = unit_weight_modules(model, unit)
        self.alphas = nn.ParameterList()
        self.scales = nn.ParameterList()
        self.scale_floors: list[torch.Tensor] = []
        self.trainable = False

    # lifecycle: setup (Lightning's first hook of a fit) -> training steps -> on_train_end ------------
    def setup(self, stage: str) -> None:
        self.make_trainable()

    def on_train_end(self) -> None:
        self.finalize()  # after the callbacks' on_train_end (LossWindows restores the best window first)

    def make_trainable(self) -> None:
        """The unit's quantizers become trainable: AdaRound alphas, learnable (LSQ) activation steps, QDrop
        on. Done once; a unit that never trains goes through it too, so finalize freezes every unit alike."""
        if self.trainable:
            return
        settings = self.settings
        alphas, scales = [], []
        if settings.weights is WeightRounding.adaround:
            for _, module in self.weight_modules:
                alphas.append(module.weight_quantizer.enable_soft_rounding(module.weight))
        for _, q in self.quantizers:
            if q.role is Role.ACTIVATION:
                if settings.activations is ActivationStep.lsq:
                    scales.append(q.make_scale_learnable())
                q.drop_prob = settings.qdrop_prob
                q.drop_draws = settings.qdrop_draws.value
                q.train()  # in-quantizer QDrop only acts in training mode
        self.alphas = nn.ParameterList(alphas)
        self.scales = nn.ParameterList(scales)
        # A learned step must stay positive: an Adam step larger than the step itself would flip its sign
        # and make the quantizer undeployable. Floor: a small fraction of the calibrated step.
        self.scale_floors = [s.detach().abs().clamp_min(torch.finfo(s.dtype).tiny) * MIN_STEP_FRACTION
                             for s in scales]
        self.trainable = True

    @property
    def has_parameters(self) -> bool:
        """Whether the unit has anything to train (known before :meth:`make_trainable` changes the model)."""
        rounds = self.settings.weights is WeightRounding.adaround and len(self.weight_modules) > 0
        steps = self.settings.activations is ActivationStep.lsq and any(
            q.role is Role.ACTIVATION for _, q in self.quantizers)
        return rounds or steps

    def configure_optimizers(self):
        optimizers, schedulers = [], []
        if len(self.alphas):
            optimizers.append(torch.optim.Adam(self.alphas, lr=self.settings.w_lr))
        if len(self.scales):
            step_optimizer = torch.optim.Adam(self.scales, lr=self.settings.a_lr)
            optimizers.append(step_optimizer)  # cosine decay of the learned activation steps only
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(
                step_optimizer, T_max=max(self.settings.iters, 1), eta_min=0.0))
        return optimizers, schedulers

    def regularizer(self, step: int) -> tuple[torch.Tensor, float]:
        beta = self.schedule.beta(step)
        if not len(self.alphas) or not self.schedule.active(step) or not self.settings.reg_weight:
            return torch.zeros((), device=self.device), beta
        return self.settings.reg_weight * sum(rounding_regularizer(a, beta) for a in self.alphas), beta

    @property
    def mixes_input(self) -> bool:
        return self.settings.qdrop_prob > 0 and self.unit.qdrop_input

    def unit_output(self, batch: dict[str, Any]) -> Any:
        """The unit's output on its (QDrop-mixed, for encoder units) quantized input; the outputs in
        ``unit.undropped_outputs`` come from a second pass with the quantizers' own dropping off."""
        q_args, q_kwargs = _as_float32(batch["q"])
        if self.mixes_input:
            fp_args, fp_kwargs = _as_float32(batch["fp"])
            draws = self.settings.qdrop_draws.value
            q_args = _mix(q_args, fp_args, self.settings.qdrop_prob, draws)
            q_kwargs = _mix(q_kwargs, fp_kwargs, self.settings.qdrop_prob, draws)
        out = self.run_unit(q_args, q_kwargs)
        if self.unit.undropped_outputs and self.settings.qdrop_prob > 0:
            with self.dropping_off():
                clean = self.run_unit(q_args, q_kwargs)
            out = tuple(clean[i] if i in self.unit.undropped_outputs else o for i, o in enumerate(out))
        return out

    @contextlib.contextmanager
    def dropping_off(self):
        dropping = [q for _, q in self.quantizers if q.drop_prob]
        try:
            for q in dropping:
                q.drop_prob = 0.0
            yield
        finally:
            for q in dropping:
                q.drop_prob = self.settings.qdrop_prob

    def reconstruction_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.unit_output(batch)
        target = _as_float32(batch["target"])
        if self.head is None:
            return lp_loss(out, target, self.settings.p, self.unit.loss_weights)
        rec = lp_loss(self.head(out, int(batch["index"])), _as_float32(batch["head_target"]), self.settings.p)
        if self.settings.par_mse_weight:
            rec = rec + self.settings.par_mse_weight * lp_loss(out, target, self.settings.p)
        return rec

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, float]:
        step = self.global_step_in_unit(batch_idx)
        rec = self.reconstruction_loss(batch)
        reg, beta = self.regularizer(step)
        loss = rec + reg
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        schedulers = self.lr_schedulers()
        for scheduler in (schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []):
            scheduler.step()
        self.keep_steps_positive_()
        # the two terms apart: their scales differ by orders of magnitude early in the beta schedule
        return {"objective": loss.item(), "rec": rec.item(), "reg": float(reg.detach()), "beta": beta}

    def global_step_in_unit(self, batch_idx: int) -> int:
        return batch_idx  # one epoch of ``iters`` sampled items per unit

    @torch.no_grad()
    def keep_steps_positive_(self) -> None:
        for scale, floor in zip(self.scales, self.scale_floors):
            torch.maximum(scale, floor.to(scale.device), out=scale)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in [*self.alphas, *self.scales]]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        for p, v in zip([*self.alphas, *self.scales], values):
            p.copy_(v)

    @torch.no_grad()
    def finalize(self) -> None:
        """Fix rounding, freeze steps, stop dropping; then prove it. FP weights stay untouched so later
        units' FP targets are those of the real FP model; the pipeline hardens weights at the end."""
        self.make_trainable()
        for _, module in self.weight_modules:
            module.weight_quantizer.fix_rounding_()
        for _, q in self.quantizers:
            q.freeze_scale()
            q.drop_prob = 0.0
            q.eval()
        leftovers = [n for n, q in self.quantizers if q.soft_rounding or q.drop_prob or q.scale_is_learnable or q.training]
        if leftovers:
            raise RuntimeError(f"unit {self.unit.name}: quantizers still soft/dropping/learnable: {leftovers[:5]}")
