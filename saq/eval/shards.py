"""Sharded evaluation: each shard evaluates every N-th image and writes its raw predictions; merging the
shards gives the metrics of the unsharded evaluation, to the last digit.

Shard i of N holds images i, i + N, i + 2N, ... of the evaluation set. Its ``shard.json.gz`` stores the
records (one per prompt, with the RLE mask), the per-image values mIoU averages, the per-prompt IoU
against the FP masks (when the ground truth is the FP model's), and the COCO ground truth of its images.
Merging puts everything back into the unsharded image order before computing AP, mIoU and fidelity, so
pycocotools and the means see exactly the sequences an unsharded run sees.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from saq.eval.evaluate import EvalResult, detections
from saq.eval.metrics import coco_mask_ap, mask_iou
from saq.utils.errors import SaqUserError
from saq.utils.run_files import atomic_file

SHARD_FILE = "shard.json.gz"
FORMAT = "saq.eval_shard/2"  # 2: checkpoint and input digests, the whole set's image ids


class ShardError(SaqUserError, ValueError):
    """The shard files do not make up one complete evaluation."""


def shard_images(images: list, shard: int, num_shards: int) -> list:
    return images[shard::num_shards]


def save_shard(run_dir: Path, shard: int, num_shards: int, checkpoint: str, gt: dict[str, Any],
               result: EvalResult, fp: EvalResult | None, header: dict[str, Any]) -> Path:
    """Write ``run_dir/shard.json.gz``; ``fp`` (same prompts) only when FP masks are the ground truth."""
    # gt_ious were appended image by image in the order of gt["images"]; recover the split by counts
    counts = _gt_iou_counts(gt, result)
    values = iter(result.gt_ious)
    gt_ious = [[next(values) for _ in range(counts[img["id"]])] for img in gt["images"]]
    payload = {
        "format": FORMAT, "shard": shard, "num_shards": num_shards, "checkpoint": checkpoint, **header,
        "gt": gt, "records": result.records, "gt_ious": gt_ious,
        "fidelity_ious": ([mask_iou(a["segmentation"], b["segmentation"]) for a, b in zip(fp.records, result.records)]
                          if fp is not None else None),
    }
    path = Path(run_dir) / SHARD_FILE
    with atomic_file(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        # pycocotools replaces evaluated ground-truth polygons by RLEs with bytes counts: store them as text
        f.write(json.dumps(payload, separators=(",", ":"), default=_text).encode())
    return path


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii")
    raise TypeError(f"cannot store {type(value).__name__} in a shard file")


def _gt_iou_counts(gt: dict[str, Any], result: EvalResult) -> dict[int, int]:
    """How many mIoU values each image contributed: one per labelled prompt, or (detector prompts) one
    per non-crowd ground-truth instance."""
    counts = {img["id"]: 0 for img in gt["images"]}
    labelled_prompts = any(r["iou_gt"] is not None for r in result.records)
    if labelled_prompts:
        for r in result.records:
            if r["iou_gt"] is not None:
                counts[r["image_id"]] += 1
    else:
        prompted = {r["image_id"] for r in result.records}
        for ann in gt["annotations"]:
            if ann["image_id"] in prompted and not ann.get("iscrowd", 0):
                counts[ann["image_id"]] += 1
    if sum(counts.values()) != len(result.gt_ious):
        raise ShardError(f"{len(result.gt_ious)} IoU values for {sum(counts.values())} expected: mixed prompt kinds")
    return counts


def load_shard(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / SHARD_FILE
    if not path.is_file():
        raise ShardError(f"{path} not found: pass the run dirs of `python -m saq.eval ... eval.num_shards=N eval.shard=i`")
    try:
        with gzip.open(path, "rt") as f:
            payload = json.load(f)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path} cannot be read ({type(exc).__name__}): run that shard again") from None
    if payload.get("format") != FORMAT:
        raise ShardError(f"{path}: shard format {payload.get('format')!r}, this version reads {FORMAT}")
    return payload


def _records_by_image(records: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Indices of each image's records, in record order."""
    by_image: dict[int, list[int]] = {}
    for j, r in enumerate(records):
        by_image.setdefault(r["image_id"], []).append(j)
    return by_image


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of the whole evaluation from all of its shards (each exactly once)."""
    if not shards:
        raise ShardError("no shard given")
    first = shards[0]
    num_shards = first["num_shards"]
    agreed = {"num_shards": "number of shards", "checkpoint_sha256": "checkpoint contents (sha256)",
              "ground_truth": "ground truth", "set_image_ids": "evaluation image set",
              "inputs_sha256": "data and prompt settings"}
    for key, what in agreed.items():
        differing = {json.dumps(s.get(key)) for s in shards}
        if len(differing) > 1:
            shown = sorted(differing) if key != "set_image_ids" else sorted(
                f"{len(json.loads(d))} images" for d in differing)
            raise ShardError(f"the shards disagree on the {what} ({key}: {', '.join(shown)[:300]}); merge the "
                             "shards of one evaluation, each run with the same checkpoint, data and prompts")
    indices = sorted(s["shard"] for s in shards)
    if indices != list(range(num_shards)):
        missing = sorted(set(range(num_shards)) - set(indices))
        raise ShardError(f"shards {indices} of {num_shards}: missing {missing}, duplicated "
                         f"{sorted({i for i in indices if indices.count(i) > 1})}")
    for s in shards:  # each shard holds exactly its share of the set: no image twice, none left out
        expected = shard_images(first["set_image_ids"], s["shard"], num_shards)
        held = [img["id"] for img in s["gt"]["images"]]
        if held != expected:
            raise ShardError(f"shard {s['shard']} of {num_shards} holds images {held[:5]}... but its share of the "
                             f"evaluation set is {expected[:5]}...; run that shard again")
    by_index = {s["shard"]: s for s in shards}
    records_of = {i: _records_by_image(s["records"]) for i, s in by_index.items()}  # one pass per shard
    # unsharded order: image k of shard i was image i + k * num_shards
    positions: list[tuple[int, int, int]] = []  # (position, shard, k)
    for i, s in by_index.items():
        positions.extend((i + k * num_shards, i, k) for k in range(len(s["gt"]["images"])))
    positions.sort()
    images, gt_ious, records, fidelity_ious = [], [], [], []
    for _, i, k in positions:
        s = by_index[i]
        image = s["gt"]["images"][k]
        images.append(image)
        gt_ious.extend(s["gt_ious"][k])
        image_records = records_of[i].get(image["id"], [])
        records.extend(s["records"][j] for j in image_records)
        if s["fidelity_ious"] is not None:
            fidelity_ious.extend(s["fidelity_ious"][j] for j in image_records)
    image_ids = {img["id"] for img in images}
    annotations = sorted((a for s in shards for a in s["gt"]["annotations"] if a["image_id"] in image_ids),
                         key=lambda a: a["id"])
    gt = {"images": images, "annotations": annotations, "categories": first["gt"]["categories"]}
    metrics = coco_mask_ap(gt, detections(EvalResult(records, {})))
    metrics["mIoU"] = float(np.mean(gt_ious)) if gt_ious else float("nan")
    if first["fidelity_ious"] is not None:
        metrics["fidelity_mIoU"] = float(np.mean(fidelity_ious)) if fidelity_ious else float("nan")
    metrics["num_images"] = len({r["image_id"] for r in records})
    metrics["num_prompts"] = len(records)
    return metrics
