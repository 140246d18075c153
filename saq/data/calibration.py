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


def empty_calibration_message(dataset: CocoInstances, prompts: dict[int, list[Prompt]]) -> str:
    """Which of the inputs is empty, when no calibration image has a prompt."""
    ids = {img.id for img in dataset.images}
    if not dataset.images:
        what = "the calibration set has no images (calib.data: check its images folder and filters)"
    elif not any(prompts.values()):
        what = (f"the calibration set has {len(ids)} images but not a single prompt (calib.prompts: with gt "
                "prompts, the annotation file lists no usable box for them; with detector prompts, the "
                "results are empty or below the score threshold)")
    else:
        what = (f"the {sum(map(len, prompts.values()))} prompts are for image ids that are not in the "
                f"{len(ids)} calibration images (calib.prompts: a results file made for another set?)")
    return f"no calibration image has a prompt: {what}"


def select_calibration(dataset: CocoInstances, prompts: dict[int, list[Prompt]], num_images: int,
                       strategy: str = "random", seed: int = 0,
                       max_prompts_per_image: int | None = None) -> list[CalibrationItem]:
    """``num_images`` images that have prompts (seeded random draw or the first N), with every prompt or
    at most ``max_prompts_per_image`` (a seeded sample when there are more)."""
    candidates = [img for img in dataset.images if prompts.get(img.id)]
    if not candidates:
        raise DatasetError(empty_calibration_message(dataset, prompts))
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
