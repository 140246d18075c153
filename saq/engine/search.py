"""Greedy searches (PCC's clipping search) as Lightning prediction loops: one batch is one search step.

A search takes no gradient step, but it needs what the reconstruction Trainer gives a loop: the model's
device, the precision plugin's autocast around every step, callbacks (progress). Lightning's predict
loop provides exactly that; each step returns its record and ``run_search`` returns them in order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from saq.engine.trainer import engine_trainer, quiet_lightning


class SearchSteps(L.LightningModule):
    """A search as a LightningModule: ``predict_step(i)`` runs ``do_step(i)`` and returns its record.

    ``do_step`` is a plain callable (not a submodule), so the Trainer never moves or re-modes the network
    the search works on.
    """

    def __init__(self, do_step: Callable[[Any], Any]) -> None:
        super().__init__()
        self.do_step = do_step

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self.do_step(batch)


def search_trainer(device: torch.device, precision: str, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """The Trainer of a search: the reconstruction's device and precision handling, no logger, no files.

    ``inference_mode=False``: a search sets quantizer ranges in place, and tensors made under inference
    mode could not take part in the reconstruction's autograd later.
    """
    return engine_trainer(device, precision, logger=False, callbacks=list(callbacks), inference_mode=False)


def run_search(trainer: L.Trainer, do_step: Callable[[Any], Any], steps: Sequence[Any]) -> list[Any]:
    """Runs ``do_step`` on every step, in order, inside ``trainer``'s predict loop; returns the records."""
    steps = list(steps)
    loader = DataLoader(range(len(steps)), batch_size=None, shuffle=False)  # indices: nothing to collate
    with quiet_lightning():
        return trainer.predict(SearchSteps(lambda index: do_step(steps[index])), dataloaders=loader,
                               return_predictions=True)
