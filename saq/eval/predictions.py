"""Per-prompt predictions and per-image COCO matches of a run, written next to metrics.json.

``predictions.json.gz`` lets a table compare two recipes image by image (paired bootstrap over the
evaluation images, :mod:`saq.eval.bootstrap`) without the model, the images or the annotation files:

* ``evals.<name>.coco``: what pycocotools' ``COCOeval.evaluate`` decided for every detection (one per
  prompt): its score and, per area range and IoU threshold, whether it is a true positive or ignored;
  and per (image, category, area range) the number of ground-truth instances that count. COCO mask AP
  of any multiset of images is recomputed from these alone.
* ``prompts``: per prompt (evaluation order) the image, category and box; ``evals.<name>.iou_pred`` /
  ``iou_gt``: per prompt the model's predicted IoU and the IoU with its ground-truth instance.
* ``digest``: fingerprints of the ground truth and of the prompts, so that only runs that saw the same
  images and prompts are paired.
* ``masks`` (only with ``masks=True``): the quantized masks as compressed COCO RLE. Off by default: a
  noisy W4A4 mask set is about 0.8 MB, ten times the rest; ``quantized.pt`` re-creates the masks.

``name`` is ``quantized`` and ``fp`` (the FP model of the same run). About 60 kB for 1000 prompts.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from saq.utils.run_files import atomic_file

log = logging.getLogger(__name__)

FILE_NAME = "predictions.json.gz"
FORMAT = 1
AREA_NAMES = ("all", "small", "medium", "large")  # pycocotools' area ranges, in its order


def _bytes_rle(seg: dict[str, Any]) -> dict[str, Any]:
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def evaluated_coco(gt: dict[str, Any], detections: list[dict[str, Any]]) -> COCOeval:
    """A segm ``COCOeval`` after ``evaluate()`` (per-image matching, before accumulation)."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes([{**d, "segmentation": _bytes_rle(d["segmentation"])} for d in detections])
        else:  # loadRes cannot take an empty list; an empty result set still needs the ground-truth counts
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
    return evaluator


def _bits(flags: np.ndarray) -> int:
    """Pack a flat bool array into an int (bit i = flags[i])."""
    return int(sum(1 << i for i, f in enumerate(flags.tolist()) if f))


def match_table(evaluator: COCOeval) -> dict[str, Any]:
    """The per-image matching of an evaluated ``COCOeval`` in compact columns.

    Detections are listed per category (ascending id), then per image (ascending id), then in
    pycocotools' order within the image (score descending, stable, at most maxDets[-1]): the order in
    which ``accumulate`` concatenates them. ``tp`` / ``ignore`` pack one bit per (area range, IoU
    threshold) at ``area * T + t``.
    """
    p = evaluator.params
    n_area, n_img, n_thr = len(p.areaRng), len(p.imgIds), len(p.iouThrs)
    dets: dict[str, list] = {"image_id": [], "category_id": [], "score": [], "tp": [], "ignore": []}
    gts: dict[str, list] = {"image_id": [], "category_id": [], "npig": []}
    for k, cat_id in enumerate(p.catIds):
        for i, img_id in enumerate(p.imgIds):
            per_area = [evaluator.evalImgs[(k * n_area + a) * n_img + i] for a in range(n_area)]
            if per_area[0] is None:  # no ground truth and no detection of this category here
                continue
            npig = [int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)) for e in per_area]
            if any(npig):
                gts["image_id"].append(int(img_id))
                gts["category_id"].append(int(cat_id))
                gts["npig"].append(npig)
            tp = np.stack([np.asarray(e["dtMatches"]) != 0 for e in per_area])  # area x T x D
            ignore = np.stack([np.asarray(e["dtIgnore"], dtype=bool) for e in per_area])
            for d, score in enumerate(per_area[0]["dtScores"]):
                dets["image_id"].append(int(img_id))
                dets["category_id"].append(int(cat_id))
                dets["score"].append(float(score))
                dets["tp"].append(_bits(tp[:, :, d].reshape(-1)))
                dets["ignore"].append(_bits(ignore[:, :, d].reshape(-1)))
    return {"image_ids": [int(i) for i in p.imgIds], "iou_thresholds": [float(t) for t in p.iouThrs],
            "areas": list(AREA_NAMES[:n_area]), "max_dets": int(p.maxDets[-1]), "num_thresholds": n_thr,
            "dets": dets, "gt": gts}


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def gt_digest(gt: dict[str, Any]) -> str:
    """Fingerprint of a ground truth: image ids and sizes, and every instance's image, class, crowd
    flag and area (what COCO AP depends on besides the masks' pixels)."""
    images = sorted((int(i["id"]), int(i["width"]), int(i["height"])) for i in gt["images"])
    anns = sorted((int(a["image_id"]), int(a["category_id"]), int(a.get("iscrowd", 0)), round(float(a["area"]), 2))
                  for a in gt["annotations"])
    return _digest([images, anns])


def prompts_digest(records: Iterable[dict[str, Any]]) -> str:
    """Fingerprint of the prompts (image, class, box) in evaluation order."""
    return _digest([[int(r["image_id"]), int(r["category_id"]), [round(float(v), 2) for v in r["box"]]]
                    for r in records])


def _prompt_columns(records: list[dict[str, Any]]) -> dict[str, list]:
    return {"image_id": [int(r["image_id"]) for r in records],
            "category_id": [int(r["category_id"]) for r in records],
            "box": [[round(float(v), 2) for v in r["box"]] for r in records]}


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def _masks(records: list[dict[str, Any]]) -> dict[str, Any]:
    sizes: dict[str, list[int]] = {}
    for r in records:
        sizes.setdefault(str(r["image_id"]), [int(v) for v in r["segmentation"]["size"]])
    counts = [r["segmentation"]["counts"] for r in records]
    return {"size": sizes, "counts": [c.decode("ascii") if isinstance(c, bytes) else c for c in counts]}


def eval_entry(gt: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The stored form of one evaluation: per-prompt IoUs and the COCO match table."""
    dets = [{k: r[k] for k in ("image_id", "category_id", "score", "segmentation")} for r in records]
    return {"iou_pred": [_round(r["iou_pred"]) for r in records],
            "iou_gt": [_round(r.get("iou_gt")) for r in records],
            "coco": match_table(evaluated_coco(gt, dets))}


def _image_name(path: Any) -> str:
    return Path(str(path)).name


def predictions_payload(eval_set, fp, quantized, calib_items=(), masks: bool = False) -> dict[str, Any]:
    """Everything ``predictions.json.gz`` holds, from the run's evaluation set and EvalResults."""
    gt = eval_set.to_coco_dict()
    eval_paths = {str(img.path) for img in eval_set.images}
    calib_paths = [str(item.image.path) for item in calib_items]
    payload = {
        "format": FORMAT,
        "image_ids": sorted(int(img.id) for img in eval_set.images),
        "digest": {"gt": gt_digest(gt), "prompts": prompts_digest(quantized.records)},
        "prompts": _prompt_columns(quantized.records),
        "calibration": {"images": [_image_name(p) for p in calib_paths],
                        "in_eval": sum(p in eval_paths for p in calib_paths)},
        "evals": {"quantized": eval_entry(gt, quantized.records)},
    }
    if fp is not quantized:
        if prompts_digest(fp.records) != payload["digest"]["prompts"]:
            raise ValueError("FP and quantized evaluations used different prompts")
        payload["evals"]["fp"] = eval_entry(gt, fp.records)
    else:  # ptq=fp: the quantized evaluation is the FP one
        payload["evals"]["fp"] = payload["evals"]["quantized"]
    if masks:
        payload["masks"] = {"quantized": _masks(quantized.records)}
    return payload


def save_predictions(run_dir: Path, eval_set, fp, quantized, calib_items=(), masks: bool = False) -> Path:
    """Write ``run_dir/predictions.json.gz`` (see the module docstring)."""
    payload = predictions_payload(eval_set, fp, quantized, calib_items, masks)
    if payload["calibration"]["in_eval"]:
        log.warning("%d calibration images are also evaluation images: this run is not a held-out "
                    "evaluation", payload["calibration"]["in_eval"])
    path = Path(run_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same predictions give the same bytes (diff-friendly once committed under results/)
    with atomic_file(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(payload, separators=(",", ":")).encode())
    return path


def load_predictions(path: Path) -> dict[str, Any]:
    """Read a ``predictions.json.gz`` (or a run dir holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        with gzip.open(path, "rt") as f:
            payload = json.load(f)
    except (OSError, EOFError, ValueError) as exc:  # truncated gzip, not gzip, bad json
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}); rerun that run's evaluation "
                         "(python -m saq.eval ckpt_path=<run>/quantized.pt) or remove the run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: predictions format {found!r}, this version reads {FORMAT}")
    return payload
