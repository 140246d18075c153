"""Side-by-side PNG of FP vs quantized masks for a few prompts of one image.

Uses matplotlib's object API with the Agg canvas (no pyplot), so no global figure state is left behind
and no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from pycocotools import mask as mask_utils

MAX_SIDE = 512  # long side of the plotted image, in pixels
PANEL_INCHES = 3.0  # long side of one panel
TITLE_INCHES = 0.3  # room above each row for the panel titles
DPI = 100
FP_COLOR = (0.12, 0.47, 0.71)
Q_COLOR = (1.0, 0.5, 0.05)


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Bool HxW mask of a COCO RLE (``counts`` as str or bytes)."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        compressed = mask_utils.frPyObjects(rle, *rle["size"])
    else:
        encoded = counts.encode("ascii") if isinstance(counts, str) else counts
        compressed = {"size": list(rle["size"]), "counts": encoded}
    return mask_utils.decode(compressed).astype(bool)


def _downscale(image: np.ndarray, masks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Image and masks with the long side at most MAX_SIDE, and the scale factor applied."""
    height, width = image.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    if scale == 1.0:
        return image, masks, scale
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    # Nearest keeps the masks binary.
    small_masks = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
                   for m in masks]
    return small, small_masks, scale


def _overlay(mask: np.ndarray, color: tuple[float, float, float], alpha: float = 0.55) -> np.ndarray:
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[mask] = (*color, alpha)
    return rgba


def save_side_by_side(path: Path, image: np.ndarray, boxes: list[tuple[float, float, float, float]],
                      fp_masks: list[np.ndarray], q_masks: list[np.ndarray], q_title: str = "quantized",
                      ious: list[float] | None = None, max_prompts: int = 4) -> Path:
    """PNG with one row per prompt (at most ``max_prompts``): image + box, FP mask, quantized mask.

    Every row has the same height, so the PNG is ``3 * panel`` wide and ``rows * (panel + title)`` high.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    rows = min(len(boxes), max_prompts)
    if len(fp_masks) < rows or len(q_masks) < rows or (ious is not None and len(ious) < rows):
        raise ValueError(f"save_side_by_side needs a FP mask, a quantized mask (and an IoU) per box: {len(boxes)} "
                         f"boxes, {len(fp_masks)} FP, {len(q_masks)} quantized masks")
    for m in [*fp_masks[:rows], *q_masks[:rows]]:
        if m.shape != image.shape[:2]:
            raise ValueError(f"mask of shape {m.shape} does not match the image {image.shape[:2]}")
    small, small_masks, scale = _downscale(image, [*fp_masks[:rows], *q_masks[:rows]])
    height, width = small.shape[:2]
    panel_w = PANEL_INCHES * width / max(height, width)
    panel_h = PANEL_INCHES * height / max(height, width)
    n_rows = max(rows, 1)  # an image without prompts still gets one row, marked as such
    fig = Figure(figsize=(3 * panel_w, n_rows * (panel_h + TITLE_INCHES)), dpi=DPI)
    FigureCanvasAgg(fig)
    # Margins in figure fractions: only the title band per row, no outer padding.
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=1.0 - TITLE_INCHES / (n_rows * (panel_h + TITLE_INCHES)),
                        wspace=0.02, hspace=TITLE_INCHES / panel_h)
    axes = fig.subplots(n_rows, 3, squeeze=False)
    for ax in axes.flat:
        ax.imshow(small)
        ax.set_axis_off()
    if rows == 0:
        axes[0, 0].set_title("no prompts", fontsize=8)
    for r in range(rows):
        x0, y0, x1, y1 = (v * scale for v in boxes[r])
        axes[r, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        axes[r, 0].set_title(f"prompt {r + 1}", fontsize=8)
        axes[r, 1].imshow(_overlay(small_masks[r], FP_COLOR))
        axes[r, 1].set_title("FP", fontsize=8)
        axes[r, 2].imshow(_overlay(small_masks[rows + r], Q_COLOR))
        axes[r, 2].set_title(q_title if ious is None else f"{q_title}  IoU {ious[r]:.3f}", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
