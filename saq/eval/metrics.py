"""COCO mask AP (pycocotools), IoU against ground truth, and fidelity of quantized vs FP masks."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from saq.utils.errors import SaqUserError

AP_KEYS = ("mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl")


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """RLE of a bool HxW mask with a JSON-friendly ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _rle(r: dict[str, Any]) -> dict[str, Any]:
    return {"size": r["size"], "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str) else r["counts"]}


def mask_iou(a: dict[str, Any], b: dict[str, Any]) -> float:
    """IoU of two RLE masks; two empty masks agree perfectly (IoU 1)."""
    a, b = _rle(a), _rle(b)
    if mask_utils.area(a) == 0 and mask_utils.area(b) == 0:
        return 1.0
    return float(mask_utils.iou([a], [b], [0])[0, 0])


def gt_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """RLE of a ground-truth annotation (polygons, RLE or uncompressed RLE)."""
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        return mask_utils.merge(rles)
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, height, width)
    return _rle(seg)


def coco_mask_ap(gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO segm AP / AP50 / AP75 / APs / APm / APl in percent (maxDets 100)."""
    if not detections:
        return {k: 0.0 for k in AP_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{**d, "segmentation": _rle(d["segmentation"])} for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # pycocotools reports -1 where a size range has no ground truth.
    return {k: float(max(v, 0.0) * 100.0) for k, v in zip(AP_KEYS, evaluator.stats[:6])}


def fidelity(fp_masks: list[dict[str, Any]], q_masks: list[dict[str, Any]]) -> float:
    """Mean IoU of quantized vs FP masks for the same prompts."""
    if len(fp_masks) != len(q_masks):
        raise ValueError(f"fidelity needs the same prompts: {len(fp_masks)} FP vs {len(q_masks)} quantized masks")
    if not fp_masks:
        return float("nan")
    return float(np.mean([mask_iou(a, b) for a, b in zip(fp_masks, q_masks)]))


class MetricOutOfRangeError(SaqUserError, RuntimeError):
    """A metric outside its possible range: the evaluation itself is broken, no number may be reported."""


def check_metric_ranges(block: dict[str, Any], where: str) -> None:
    """AP-type metrics lie in [0, 100] (or are -1, pycocotools' "no instance of this size"), IoUs in [0, 1]."""
    for key, value in block.items():
        if not isinstance(value, (int, float)):
            continue
        if key.startswith("mask_AP"):
            ok = value == -1 or 0.0 <= value <= 100.0
        elif "IoU" in key:
            ok = 0.0 <= value <= 1.0
        else:
            continue
        if not ok or value != value:
            raise MetricOutOfRangeError(f"{where}.{key} = {value} cannot exist; the evaluation is broken "
                                        "(duplicate ids or corrupt annotations?) and nothing is reported")
