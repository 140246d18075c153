"""Box prompts per image: ground-truth boxes or a detector's results (COCO results format)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from saq.data.coco import CocoInstances, DatasetError


@dataclass(frozen=True)
class Prompt:
    box_xyxy: tuple[float, float, float, float]  # original image pixels
    score: float  # detector score (1.0 for ground-truth boxes)
    category_id: int
    ann_id: int | None = None  # the ground-truth instance the box came from, if any


def _xywh_to_xyxy(b) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in b)
    return (x, y, x + w, y + h)


def gt_prompts(dataset: CocoInstances) -> dict[int, list[Prompt]]:
    """One box per non-crowd ground-truth instance."""
    return {img.id: [Prompt(_xywh_to_xyxy(a["bbox"]), 1.0, a["category_id"], a["id"])
                     for a in dataset.annotations_of(img.id) if not a.get("iscrowd", 0)]
            for img in dataset.images}


def detector_prompts(dataset: CocoInstances, path: str | Path, score_threshold: float = 0.0,
                     max_per_image: int = 100) -> dict[int, list[Prompt]]:
    """Boxes from a COCO results json (image_id, category_id, bbox xywh, score), best first."""
    path = Path(path).expanduser()
    if len(dataset.set_names) > 1:
        raise DatasetError("detector prompts refer to one annotation file's image ids; use a single data set")
    if not path.is_file():
        raise DatasetError(f"detector results not found: {path}. Set prompts.path to a COCO results json")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"detector results {path} are not valid JSON ({exc})") from exc
    if not isinstance(results, list):
        raise DatasetError(f"detector results {path} must be a list of {{image_id, category_id, bbox, score}}")
    by_source = {img.source_id: img.id for img in dataset.images}
    prompts: dict[int, list[Prompt]] = {img.id: [] for img in dataset.images}
    for r in results:
        if r.get("image_id") in by_source and float(r.get("score", 1.0)) >= score_threshold:
            prompts[by_source[r["image_id"]]].append(Prompt(_xywh_to_xyxy(r["bbox"]), float(r.get("score", 1.0)),
                                                            int(r["category_id"])))
    return {k: sorted(v, key=lambda p: -p.score)[:max_per_image] for k, v in prompts.items()}


def labelled_prompts_from_config(cfg: Mapping[str, Any], dataset: CocoInstances) -> dict[int, list[Prompt]]:
    """A ``prompts`` node of source gt or detector. Every source: ``saq.data.prompts_from_config``."""
    source = cfg["source"]
    if source == "gt":
        return gt_prompts(dataset)
    if source == "detector":
        return detector_prompts(dataset, cfg["path"], float(cfg.get("score_threshold", 0.0)),
                                int(cfg.get("max_per_image", 100)))
    raise ValueError(f"unknown prompt source {source!r}: use prompts=gt or prompts=detector")


def prompts_to_json(prompts: dict[int, list[Prompt]]) -> dict[str, Any]:
    return {str(k): [[*p.box_xyxy, p.score, p.category_id, p.ann_id] for p in v] for k, v in prompts.items()}
