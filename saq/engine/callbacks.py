"""Callbacks of a unit's Trainer: loss windows (logged curve, plotted curve, best window, restored at the
end of a unit before the module freezes itself), and the per-unit checkpoint."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import Callback

from saq.config.schema import ReconConfig
from saq.engine.reconstruction import UnitReconstruction

PLOT_POINTS_PER_UNIT = 50


class LossWindows(Callback):
    """Window means of the reconstruction term: one logged point per ``best_window`` steps, about 50
    plotted points per unit (one per step on short runs), and a snapshot of the best window."""

    def __init__(self, settings: ReconConfig, iters: int, step_offset: int) -> None:
        self.settings, self.step_offset = settings, step_offset
        self.plot_every = max(1, min(settings.best_window, iters // PLOT_POINTS_PER_UNIT))
        self.window: list[float] = []
        self.plot_window: list[float] = []
        self.curve: list[list[float]] = []
        self.first_loss: float | None = None
        self.best_loss = float("inf")
        self.best: list | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: UnitReconstruction, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rec = float(outputs["rec"])
        self.first_loss = rec if self.first_loss is None else self.first_loss
        self.steps += 1
        self.window.append(rec)
        self.plot_window.append(rec)
        last = batch_idx == trainer.num_training_batches - 1
        if len(self.plot_window) >= self.plot_every or last:
            self.curve.append([self.step_offset + self.steps, sum(self.plot_window) / len(self.plot_window)])
            self.plot_window = []
        if len(self.window) >= self.settings.best_window or last:
            mean = sum(self.window) / len(self.window)
            self.window = []
            if mean < self.best_loss:  # reported always; restored at the end only with keep_best
                self.best_loss = mean
                self.best = pl_module.snapshot() if self.settings.keep_best else None
            name = pl_module.unit.name
            pl_module.log_dict({f"recon/{name}/loss": mean, f"recon/{name}/rec_last": rec,
                                f"recon/{name}/reg": float(outputs["reg"]), f"recon/{name}/beta": float(outputs["beta"]),
                                "recon/loss": mean}, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: UnitReconstruction) -> None:
        # before the module's own on_train_end, which freezes the unit
        if self.settings.keep_best and self.best is not None:
            pl_module.restore(self.best)


class UnitCheckpoint(Callback):
    """Saves the model state once the unit is final (on_fit_end: after the module froze itself at
    on_train_end): a killed run resumes from the last finished unit."""

    def __init__(self, save: Callable[[], None]) -> None:
        self.save = save

    def on_fit_end(self, trainer: L.Trainer, pl_module: UnitReconstruction) -> None:
        self.save()
