"""Choosing the calibration images and their prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from saq.data.coco import CocoInstances, DatasetError, ImageRecord
from saq.data.prompts import Prompt


@dataclass(frozen=True)
class CalibrationItem:
    image: ImageRecord
    prompts: list[Prompt]


def select_calibration(dataset: CocoInstances, prompts: dict[int, list[Prompt]], num_images: int,
                       strategy: str = "random", seed: int = 0, max_prompts_per_image: int = 16) -> list[CalibrationItem]:
    """``num_images`` images that have prompts (seeded random draw or the first N), at most
    ``max_prompts_per_image`` prompts each (a seeded sample when there are more)."""
    candidates = [img for img in dataset.images if prompts.get(img.id)]
    if not candidates:
        raise DatasetError("no calibration image has a prompt: check calib.data and calib.prompts")
    if num_images > len(candidates):
        raise DatasetError(f"calib.num_images={num_images} but only {len(candidates)} images have prompts")
    rng = random.Random(seed)
    if strategy == "random":
        chosen = rng.sample(candidates, num_images)
    elif strategy == "first":
        chosen = candidates[:num_images]
    else:
        raise ValueError(f"unknown calibration strategy {strategy!r}: use 'random' or 'first'")
    items = []
    for img in chosen:
        boxes = prompts[img.id]
        if len(boxes) > max_prompts_per_image:
            boxes = rng.sample(boxes, max_prompts_per_image)
        items.append(CalibrationItem(img, boxes))
    return items
