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
                       strategy: str = "random", seed: int = 0,
                       max_prompts_per_image: int | None = None) -> list[CalibrationItem]:
    """``num_images`` images that have prompts (seeded random draw or the first N), with every prompt or
    at most ``max_prompts_per_image`` (a seeded sample when there are more)."""
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
        if max_prompts_per_image is not None and len(boxes) > max_prompts_per_image:
            boxes = rng.sample(boxes, max_prompts_per_image)
        items.append(CalibrationItem(img, boxes))
    return items


def cap_prompts(items: list[CalibrationItem], max_prompts_per_image: int | None, seed: int = 0
                ) -> list[CalibrationItem]:
    """The same images with at most ``max_prompts_per_image`` prompts each (a seeded sample): the
    reconstruction batch (docs/method.md section 5); BIG, PCC and the observers see every prompt."""
    if max_prompts_per_image is None:
        return list(items)
    rng = random.Random(seed)
    return [CalibrationItem(item.image, rng.sample(item.prompts, max_prompts_per_image)
                            if len(item.prompts) > max_prompts_per_image else list(item.prompts)) for item in items]
