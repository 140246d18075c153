"""The engine's precision setting (``runtime.precision``) as Lightning's own precision plugins.

The reconstruction Trainer takes the string itself; loops that are searches rather than training (PCC)
run their forward passes in the same plugin's ``forward_context``, so both compute alike.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from saq.config.schema import PRECISIONS


def precision_plugin(precision: str, device: torch.device) -> Precision:
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.precision={precision!r}: choose one of {list(PRECISIONS)}")
    if precision == "32-true":
        return Precision()
    return MixedPrecision(precision, device.type)


def forward_context(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context (none for 32-true) the Trainer would use for this precision."""
    return precision_plugin(precision, device).forward_context()
