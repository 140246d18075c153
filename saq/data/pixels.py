"""Any PIL image as the RGB uint8 array SAM expects.

PIL's own ``convert("RGB")`` saturates 16-bit, 32-bit integer and float images (a 16-bit microscopy
frame becomes almost all white), so those are rescaled by their own range first: the darkest pixel
becomes 0 and the brightest 255, as an image viewer shows them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from saq.utils.errors import SaqUserError

# Modes PIL converts to RGB correctly by itself (8 bits per channel, palettes, alpha dropped, CMYK, YCbCr).
CONVERTIBLE_MODES = frozenset({"1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# Single-channel modes with more than 8 bits: rescaled by their range.
WIDE_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


class UnsupportedImageError(SaqUserError, ValueError):
    """An image whose pixels cannot be turned into RGB faithfully."""


def rescale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear map of [min, max] onto [0, 255]; a constant image becomes 0."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise UnsupportedImageError("the image has NaN or infinite pixels")
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def to_rgb8(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8. Raises UnsupportedImageError for modes with no faithful conversion (e.g. LAB, HSV)."""
    if img.mode in WIDE_MODES:
        gray = rescale_to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in CONVERTIBLE_MODES:
        return np.asarray(img.convert("RGB"))
    raise UnsupportedImageError(f"PIL image mode {img.mode!r} has no faithful RGB conversion here; "
                                "save the image as 8- or 16-bit RGB or grayscale")


__all__ = ["CONVERTIBLE_MODES", "UnsupportedImageError", "WIDE_MODES", "rescale_to_uint8", "to_rgb8"]
