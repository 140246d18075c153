"""Granularity of quantization parameters as value types (one scale per tensor or per channel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim))

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per slice along ``axis`` (axis 0 = output channel of a weight)."""

    axis: int = 0

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        axis = self.axis % ndim
        return tuple(d for d in range(ndim) if d != axis)

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        # Broadcastable against the tensor: size C on the channel axis, 1 elsewhere.
        axis = self.axis % len(shape)
        return tuple(s if d == axis else 1 for d, s in enumerate(shape))

    def __str__(self) -> str:
        return "channel" if self.axis == 0 else f"channel{self.axis}"


Granularity = Union[PerTensor, PerChannel]


def granularity_from_str(name: str) -> Granularity:
    """Parse the spelling: ``tensor``, ``channel`` (output channel of a weight, axis 0) or ``channel<k>``
    (one range per index of axis k, e.g. ``channel1`` for the channels of an (N, C, H, W) activation)."""
    if name == "tensor":
        return PerTensor()
    if name == "channel":
        return PerChannel(0)
    if name.startswith("channel") and name[len("channel"):].isdigit():
        return PerChannel(int(name[len("channel"):]))
    raise ValueError(f"unknown granularity {name!r}: use 'tensor', 'channel' or 'channel<axis>'")
