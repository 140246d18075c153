"""The project's COCO mask AP and IoU against torchmetrics, an independent implementation.

The ground truth is the real coco8_seg annotations; the predictions are those masks shifted, grown,
shrunk, relabelled, dropped and joined by false positives, so AP lies strictly between 0 and 100 and
every IoU threshold matters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.functional.classification import binary_jaccard_index

from saq.data import dataset_from_config
from saq.eval.metrics import coco_mask_ap, encode_mask, fidelity, gt_rle, mask_iou
from saq.eval.visualize import rle_to_mask


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilation by a (2 * pixels + 1) square; a negative ``pixels`` erodes (dilation of the complement)."""
    if pixels < 0:
        return ~_grow(~mask, -pixels)
    t = torch.from_numpy(mask).float()[None, None]
    return torch.nn.functional.max_pool2d(t, 2 * pixels + 1, stride=1, padding=pixels)[0, 0].bool().numpy()


def _perturbed(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask shifted by a few pixels, then grown or shrunk: IoUs spread over 0.3 ... 1."""
    shifted = np.roll(mask, tuple(rng.integers(-6, 7, size=2)), axis=(0, 1))
    return _grow(shifted, int(rng.integers(-2, 3)))


def _false_positive(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask = np.zeros((height, width), bool)
    mask[y0:y0 + int(rng.integers(5, height // 2)), x0:x0 + int(rng.integers(5, width // 2))] = True
    return mask


def _scene(coco8):
    """(COCO gt dict, per-image gt masks/labels/crowd/area, per-image predictions)."""
    rng = np.random.default_rng(0)
    ds = dataset_from_config(coco8)
    categories = sorted({a["category_id"] for a in ds.annotations})
    images = []
    for img in ds.images:
        anns = ds.annotations_of(img.id)
        gt_masks = [rle_to_mask(gt_rle(a, img.height, img.width)) for a in anns]
        preds = []  # (mask, score, label)
        for ann, mask in zip(anns, gt_masks):
            if rng.random() < 0.15:
                continue  # a missed instance
            label = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(categories))
            preds.append((_perturbed(mask, rng), float(rng.uniform(0.05, 1.0)), label))
        for _ in range(int(rng.integers(0, 3))):
            preds.append((_false_positive(img.height, img.width, rng), float(rng.uniform(0.05, 1.0)),
                          int(rng.choice(categories))))
        images.append((img, anns, gt_masks, preds))
    return ds.to_coco_dict(), images


def _ours(gt, images) -> dict[str, float]:
    detections = [{"image_id": img.id, "category_id": label, "score": score, "segmentation": encode_mask(mask)}
                  for img, _, _, preds in images for mask, score, label in preds]
    return coco_mask_ap(gt, detections)


def _torchmetrics(images) -> dict[str, float]:
    metric = MeanAveragePrecision(iou_type="segm", backend="pycocotools")
    for img, anns, gt_masks, preds in images:
        empty = torch.zeros((0, img.height, img.width), dtype=torch.bool)
        metric.update(
            [{"masks": torch.from_numpy(np.stack([m for m, _, _ in preds])) if preds else empty,
              "scores": torch.tensor([s for _, s, _ in preds], dtype=torch.float32),
              "labels": torch.tensor([c for _, _, c in preds], dtype=torch.long)}],
            [{"masks": torch.from_numpy(np.stack(gt_masks)),
              "labels": torch.tensor([a["category_id"] for a in anns]),
              "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns]),
              "area": torch.tensor([float(a["area"]) for a in anns])}])
    return {k: float(v) for k, v in metric.compute().items() if v.numel() == 1}


def test_coco_mask_ap_equals_torchmetrics(coco8):
    gt, images = _scene(coco8)
    ours, theirs = _ours(gt, images), _torchmetrics(images)
    assert 10.0 < ours["mask_AP"] < 90.0  # a real ranking problem, not a trivial 0 or 100
    assert ours["mask_AP50"] > ours["mask_AP75"]  # the perturbations cross IoU thresholds
    pairs = {"mask_AP": "map", "mask_AP50": "map_50", "mask_AP75": "map_75",
             "mask_APs": "map_small", "mask_APm": "map_medium", "mask_APl": "map_large"}
    for key, tm_key in pairs.items():  # torchmetrics reports -1 for a size range without ground truth
        assert ours[key] / 100.0 == pytest.approx(max(theirs[tm_key], 0.0), abs=1e-6), key


def test_mask_iou_and_fidelity_equal_torchmetrics_jaccard():
    """mask_iou is the exact |A & B| / |A | B| (float64), torchmetrics' binary Jaccard agrees to float32
    precision; two empty masks agree perfectly (torchmetrics' zero_division=1)."""
    rng = np.random.default_rng(1)
    pairs = [(rng.random((61, 83)) < p, rng.random((61, 83)) < q) for p, q in rng.uniform(0.05, 0.9, (20, 2))]
    pairs.append((np.zeros((61, 83), bool), np.zeros((61, 83), bool)))
    ours = [mask_iou(encode_mask(a), encode_mask(b)) for a, b in pairs]
    exact = [(a & b).sum() / (a | b).sum() if (a | b).any() else 1.0 for a, b in pairs]
    theirs = [float(binary_jaccard_index(torch.from_numpy(b).long(), torch.from_numpy(a).long(), zero_division=1))
              for a, b in pairs]
    assert ours == [float(v) for v in exact]
    assert ours == pytest.approx(theirs, abs=1e-6)
    fp, q = [encode_mask(a) for a, _ in pairs], [encode_mask(b) for _, b in pairs]
    assert fidelity(fp, q) == pytest.approx(float(np.mean(theirs)), abs=1e-6)
