"""The Lightning Trainer that runs one unit, and the bridge from Lightning's logging to the run logger.

One W&B run covers a whole PTQ run (calibration plots, reconstruction, evaluation tables), so the
Trainer logs into it through ``RunLoggerBridge`` rather than opening a W&B run per unit; Lightning's own
CSVLogger writes the reconstruction metrics of every unit as CSV next to it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only

from saq.engine.progress import LoopProgress
from saq.utils.loggers import RunLogger


class RunLoggerBridge(Logger):
    """Lightning logger that forwards to the run's logger, with steps continued across units."""

    def __init__(self, run_logger: RunLogger, step_offset: int) -> None:
        super().__init__()
        self.run_logger, self.step_offset = run_logger, step_offset

    @property
    def name(self) -> str:
        return "saq"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        self.run_logger.log_metrics(metrics, step=self.step_offset + (step or 0) + 1)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def accelerator_and_devices(device: torch.device) -> tuple[str, Any]:
    if device.type == "cuda":
        return "cuda", [device.index if device.index is not None else torch.cuda.current_device()]
    return device.type, 1


def engine_trainer(device: torch.device, precision: str, **kwargs: Any) -> L.Trainer:
    """A Trainer on ``device`` in ``precision`` with what every engine loop leaves out: Lightning's progress
    bar, checkpoints, model summary and its per-Trainer "GPU available" banner."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    accelerator, devices = accelerator_and_devices(device)
    return L.Trainer(accelerator=accelerator, devices=devices, precision=precision, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=False, **kwargs)


def unit_trainer(unit_name: str, device: torch.device, precision: str, run_dir: Path, run_logger: RunLogger,
                 step_offset: int, iters: int, callbacks: list, progress: bool) -> L.Trainer:
    """One epoch over the unit's sampled items; the module's manual optimisation steps once per item."""
    loggers = [RunLoggerBridge(run_logger, step_offset),
               CSVLogger(str(run_dir), name="recon_csv", version=unit_name)]  # recon_csv/<unit>/metrics.csv
    if progress:
        callbacks = [*callbacks, LoopProgress(f"recon {unit_name}", iters,
                                              lambda out: {"rec": f"{float(out['rec']):.4g}"}, every=10)]
    return engine_trainer(device, precision, max_epochs=1, logger=loggers, callbacks=callbacks, log_every_n_steps=1,
                          num_sanity_val_steps=0, default_root_dir=str(run_dir))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without the Lightning warnings that do not apply to the engine's loops."""
    with warnings.catch_warnings():
        # the cached items and search steps live in memory: worker processes would only copy them
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LightningModule.*without a `validation_step`.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning's own use of a deprecated torch API
        yield


def fit_quietly(trainer: L.Trainer, module: L.LightningModule, loader) -> None:
    with quiet_lightning():
        trainer.fit(module, train_dataloaders=loader)
