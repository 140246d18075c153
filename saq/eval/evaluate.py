"""Evaluate a SAM (FP or quantized) on a COCO set with box prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from saq.data.coco import CocoInstances, load_image
from saq.data.prompts import Prompt
from saq.models.finite import NonFiniteOutputError, non_finite_error, watch_finite
from saq.eval.metrics import coco_mask_ap, encode_mask, fidelity, gt_rle, mask_iou
from saq.models.predictor import decode_boxes, encode_image, model_device


@dataclass
class EvalResult:
    """Per-prompt predictions and the metrics computed from them."""

    records: list[dict[str, Any]]  # image_id, category_id, score, iou_pred, segmentation (RLE), iou_gt
    metrics: dict[str, float]
    timing: dict[str, float] = field(default_factory=dict)
    gt_ious: list[float] = field(default_factory=list)  # the values mIoU averages, in image order

    def masks(self) -> list[dict[str, Any]]:
        return [r["segmentation"] for r in self.records]


def _synchronized_clock(device: torch.device) -> float:
    """perf_counter after the device finished its queued work: CUDA kernels run asynchronously, so an
    unsynchronised timer would charge the encoder's time to whatever synchronises next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _DecodedImages(Dataset):
    """Images decoded to RGB arrays, in DataLoader workers while the model runs on earlier ones."""

    def __init__(self, images: list) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return load_image(self.images[i].path)


def _as_is(item: Any) -> Any:
    return item  # the array itself: the default collate would turn it into a tensor


def decoded_images(images: list, num_workers: int = 0) -> Iterator[np.ndarray]:
    """The decoded images in order; ``num_workers`` > 0 decodes ahead in worker processes (GPU nodes,
    where JPEG decoding on the main process would leave the device idle)."""
    if num_workers <= 0:
        return (load_image(img.path) for img in images)
    return iter(DataLoader(_DecodedImages(images), batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                           prefetch_factor=2))


def _best_gt_iou(rles: list[dict], gts: list[dict]) -> list[float]:
    """For each ground-truth instance, the best IoU with any predicted mask (detector prompts)."""
    return [max((mask_iou(p, g) for p in rles), default=0.0) for g in gts]


def evaluate(model: torch.nn.Module, dataset: CocoInstances, prompts: dict[int, list[Prompt]],
             desc: str = "eval", prompt_batch: int = 16, show_progress: bool = True, num_workers: int = 0
             ) -> EvalResult:
    """Predict one mask per box, then COCO mask AP and mean IoU against ground truth.

    Raises NonFiniteOutputError (naming the first module at fault) as soon as the model produces NaN/inf:
    such masks are empty and would report AP 0 as a result."""
    with watch_finite(model) as watch:
        def check(image, path, boxes, masks, ious) -> None:
            if watch.tripped:
                raise non_finite_error(model, image, path, desc, boxes)

        return _evaluate(lambda image: encode_image(model, image),
                         lambda encoded, boxes: decode_boxes(model, encoded, boxes, prompt_batch),
                         check, dataset, prompts, desc, show_progress, num_workers,
                         clock=lambda: _synchronized_clock(model_device(model)))


def evaluate_runtime(predictor: Any, dataset: CocoInstances, prompts: dict[int, list[Prompt]],
                     desc: str = "eval", prompt_batch: int = 16, show_progress: bool = True, num_workers: int = 0
                     ) -> EvalResult:
    """``evaluate`` for an exported model on an inference runtime (``saq.deploy.Predictor``: its
    ``encode(image)`` and ``decode_boxes(encoding, boxes, batch)``), with the same data, prompts and metrics."""
    def check(image, path, boxes, masks, ious) -> None:
        if not bool(torch.isfinite(ious).all()):
            raise NonFiniteOutputError(f"{desc}: the exported model produced NaN/inf on {path}; check the export "
                                       "(its quantizer ranges) and the runtime")

    return _evaluate(predictor.encode, lambda encoded, boxes: predictor.decode_boxes(encoded, boxes, prompt_batch),
                     check, dataset, prompts, desc, show_progress, num_workers)


def _evaluate(encode: Callable[[np.ndarray], Any], decode: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              check: Callable[..., None], dataset: CocoInstances, prompts: dict[int, list[Prompt]], desc: str,
              show_progress: bool, num_workers: int = 0, clock: Callable[[], float] = time.perf_counter
              ) -> EvalResult:
    records: list[dict[str, Any]] = []
    ious: list[float] = []
    t_encoder = t_decoder = 0.0
    n_images = 0
    prompted = [img for img in dataset.images if prompts.get(img.id)]
    skipped = len(dataset.images) - len(prompted)
    images = decoded_images(prompted, num_workers)
    for img, image in tqdm(zip(prompted, images), total=len(prompted), desc=desc, disable=not show_progress,
                           leave=False):
        boxes = prompts[img.id]
        t0 = clock()
        encoded = encode(image)
        t1 = clock()
        box_tensor = torch.tensor([p.box_xyxy for p in boxes])
        masks, iou_pred = decode(encoded, box_tensor)
        t2 = clock()
        check(image, img.path, box_tensor, masks, iou_pred)
        t_encoder, t_decoder, n_images = t_encoder + t1 - t0, t_decoder + t2 - t1, n_images + 1
        masks_np = masks.cpu().numpy()
        gts = {a["id"]: a for a in dataset.annotations_of(img.id)}
        image_rles = []
        for prompt, mask, iou in zip(boxes, masks_np, iou_pred.tolist()):
            rle = encode_mask(mask)
            image_rles.append(rle)
            record = {"image_id": img.id, "category_id": prompt.category_id, "score": prompt.score * iou,
                      "box": list(prompt.box_xyxy),
                      "iou_pred": iou, "segmentation": rle, "iou_gt": None}
            if prompt.ann_id is not None:
                gt = gts[prompt.ann_id]
                record["iou_gt"] = mask_iou(rle, gt_rle(gt, img.height, img.width))
                ious.append(record["iou_gt"])
            records.append(record)
        if all(p.ann_id is None for p in boxes):
            ious.extend(_best_gt_iou(image_rles, [gt_rle(g, img.height, img.width) for g in gts.values()
                                                  if not g.get("iscrowd", 0)]))
    if not records:
        raise ValueError(f"{desc}: no image has a prompt ({skipped} images without prompts); check prompts=")
    result = EvalResult(records, {})
    metrics = coco_mask_ap(dataset.to_coco_dict(), detections(result))
    metrics["mIoU"] = float(np.mean(ious)) if ious else float("nan")
    metrics["num_images"] = n_images
    metrics["num_prompts"] = len(records)
    metrics["images_without_prompts"] = skipped
    timing = {"encoder_s_per_image": t_encoder / max(n_images, 1), "decoder_s_per_image": t_decoder / max(n_images, 1),
              "decoder_s_per_prompt": t_decoder / max(len(records), 1)}
    return EvalResult(records, metrics, timing, ious)


def detections(result: EvalResult) -> list[dict[str, Any]]:
    """The records in COCO results format."""
    return [{k: r[k] for k in ("image_id", "category_id", "score", "segmentation")} for r in result.records]


def save_examples(path, dataset: CocoInstances, fp: EvalResult, quantized: EvalResult, title: str,
                  count: int = 4):
    """Side-by-side PNG (image + box, FP mask, quantized mask) for up to ``count`` prompts of the
    evaluated image with the most prompts (ties: the first)."""
    from saq.eval.metrics import mask_iou
    from saq.eval.visualize import rle_to_mask, save_side_by_side

    by_image: dict[int, list[int]] = {}
    for i, r in enumerate(fp.records):
        by_image.setdefault(r["image_id"], []).append(i)
    image_id = max(by_image, key=lambda k: len(by_image[k]))
    picks = by_image[image_id][:count]
    return save_side_by_side(
        path, load_image(dataset.image(image_id).path), [tuple(fp.records[i]["box"]) for i in picks],
        [rle_to_mask(fp.records[i]["segmentation"]) for i in picks],
        [rle_to_mask(quantized.records[i]["segmentation"]) for i in picks], q_title=title,
        ious=[mask_iou(fp.records[i]["segmentation"], quantized.records[i]["segmentation"]) for i in picks],
        max_prompts=count)


def per_set_metrics(dataset: CocoInstances, result: EvalResult) -> dict[str, dict[str, float]]:
    """Metrics of each constituent set of a concatenated evaluation set."""
    if len(dataset.set_names) < 2:
        return {}
    out = {}
    for name in dataset.set_names:
        ids = {img.id for img in dataset.images if img.set_name == name}
        sub = dataset.subset(ids)
        recs = [r for r in result.records if r["image_id"] in ids]
        dets = [{k: r[k] for k in ("image_id", "category_id", "score", "segmentation")} for r in recs]
        m = coco_mask_ap(sub.to_coco_dict(), dets)
        gt_ious = [r["iou_gt"] for r in recs if r["iou_gt"] is not None]
        m["mIoU"] = float(np.mean(gt_ious)) if gt_ious else float("nan")
        out[name] = m
    return out


def add_fidelity(result: EvalResult, reference: EvalResult) -> None:
    """Mean IoU of ``result``'s masks against ``reference``'s (same prompts), stored in its metrics."""
    result.metrics["fidelity_mIoU"] = fidelity(reference.masks(), result.masks())
