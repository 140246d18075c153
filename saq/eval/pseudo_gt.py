"""Fidelity evaluation without labels: the FP model's masks become the ground truth."""

from __future__ import annotations

from pycocotools import mask as mask_utils

from saq.data.coco import CocoInstances
from saq.data.prompts import Prompt
from saq.eval.evaluate import EvalResult
from saq.eval.metrics import _rle


def pseudo_ground_truth(dataset: CocoInstances, prompts: dict[int, list[Prompt]], fp: EvalResult
                        ) -> tuple[CocoInstances, dict[int, list[Prompt]]]:
    """A copy of ``dataset`` whose annotations are the FP masks, and prompts that point at them, so
    that AP and IoU of a quantized model measure agreement with the FP model prompt by prompt."""
    annotations, new_prompts = [], {}
    records = iter(fp.records)  # evaluate() walks images in dataset order and prompts in order
    for img in dataset.images:
        new_prompts[img.id] = []
        for prompt in prompts.get(img.id, []):
            record = next(records)
            rle = _rle(record["segmentation"])
            ann_id = len(annotations) + 1
            annotations.append({"id": ann_id, "image_id": img.id, "category_id": 1, "iscrowd": 0,
                                "segmentation": record["segmentation"], "area": float(mask_utils.area(rle)),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
            new_prompts[img.id].append(Prompt(prompt.box_xyxy, prompt.score, 1, ann_id))
    categories = [{"id": 1, "name": "object"}]
    return CocoInstances(list(dataset.images), annotations, categories, dataset.set_names), new_prompts
