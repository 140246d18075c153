"""The progress bar of the engine's loops: one tqdm bar over the batches of a fit (a reconstruction
unit's steps) or of a prediction loop (a search's steps), with a postfix computed from the step's output.

Lightning's own bar counts epochs and validation batches, which neither loop has; this one is named after
the unit or search and shows the quantity that loop optimises."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm


class LoopProgress(Callback):
    """``total`` steps under ``desc``; ``postfix(outputs)`` every ``every`` steps (None: no postfix)."""

    def __init__(self, desc: str, total: int, postfix: Callable[[Any], dict[str, Any]] | None = None,
                 every: int = 1) -> None:
        self.desc, self.total, self.postfix, self.every = desc, total, postfix, max(1, every)
        self.bar = None

    def _open(self) -> None:
        self.bar = tqdm(total=self.total, desc=self.desc, leave=False)

    def _advance(self, outputs: Any, batch_idx: int) -> None:
        self.bar.update(1)
        if self.postfix is not None and batch_idx % self.every == 0:
            self.bar.set_postfix(**self.postfix(outputs))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # a fit (reconstruction unit)
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._advance(outputs, batch_idx)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    # a prediction loop (search)
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._advance(outputs, batch_idx)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
