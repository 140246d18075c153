"""Checks that take milliseconds and save hours: run before the model is built or any image is seen."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from saq.data.coco import CocoInstances, verify_images
from saq.utils.errors import SaqUserError

MIN_BITS, MAX_BITS = 2, 16  # what saq.quant.functional.int_range accepts


class PreflightError(SaqUserError, ValueError):
    """A setting that would fail later, after the long work; the message names the config key."""


def _bit_settings(quant: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for part in ("encoder", "decoder"):
        for kind in ("w_bits", "a_bits"):
            yield f"quant.{part}.{kind}", (quant.get(part) or {}).get(kind)
    for i, rule in enumerate(quant.get("rules") or []):
        for kind in ("w_bits", "a_bits"):
            yield f"quant.rules[{i}].{kind}", rule.get(kind)


def check_bit_widths(quant: Mapping[str, Any]) -> None:
    """Every bit width is null (floating point) or an integer in [2, 16]."""
    for key, bits in _bit_settings(quant):
        valid = isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS
        if bits is not None and not valid:
            raise PreflightError(f"{key}={bits}: bit widths must be integers in [{MIN_BITS}, {MAX_BITS}], "
                                 "or null to keep that part in floating point")


def preflight(config: Mapping[str, Any], eval_set: CocoInstances, calib_set: CocoInstances) -> None:
    """Bit widths (when quantizing) and every image file of both sets."""
    if config["ptq"].get("quantize"):
        check_bit_widths(config["quant"])
    verify_images(eval_set, "data.images")
    verify_images(calib_set, "calib.data.images")
