"""COCO mask AP of resampled image sets, vectorised, and paired bootstrap intervals between runs.

The per-image matching is fixed by ``COCOeval.evaluate`` (stored by :mod:`saq.eval.predictions`); only
pycocotools' accumulation is redone here, for many image multisets at once. A resample draws the
evaluation images with replacement and is represented by integer weights (how often each image was
drawn): a detection of an image drawn w times enters the precision/recall curve as w copies.

Copies need not be expanded. For a run of w identical true positives precision rises along the run, so
the envelope (max precision at equal or higher recall) and the first point reaching a recall threshold
both see the value at the run's last copy: the weighted cumulative sums. For w identical false positives
recall stays flat and precision falls, so only the first copy can matter: its precision uses the false
positive count before the other w - 1 copies. A detection of an image drawn 0 times (or an ignored one)
repeats the previous point and changes nothing. With all weights 1 the arithmetic is pycocotools' own,
so the full-set AP equals ``COCOeval`` (tie order between detections of equal score included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# pycocotools' recall thresholds, built the way it builds them (the values must match bit for bit)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)

# metric name -> (area range index, IoU threshold indices or None for all): pycocotools' stats[0:6]
METRICS = {"mask_AP": (0, None), "mask_AP50": (0, [0]), "mask_AP75": (0, [5]),
           "mask_APs": (1, None), "mask_APm": (2, None), "mask_APl": (3, None)}

_MAX_CHUNK_ELEMENTS = 4_000_000  # resamples x thresholds x detections per vectorised step


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections in accumulation order, and its countable ground truth per image."""

    det_image: np.ndarray  # (D,) index of each detection's image in the pool
    tp: np.ndarray  # (A, T, D) bool: matched to a ground-truth instance
    ignore: np.ndarray  # (A, T, D) bool: matched to an ignored instance, or unmatched outside the area range
    npig: np.ndarray  # (A, I) ground-truth instances that count, per image of the pool


@dataclass(frozen=True)
class MatchTable:
    """A run's per-image COCO matching over an image pool (the images a resample draws from)."""

    image_ids: tuple[int, ...]
    categories: tuple[CategoryMatches, ...]
    num_thresholds: int

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def _unpack(bits: Sequence[int], n_bits: int) -> np.ndarray:
    """(len(bits), n_bits) bool from ints packed by ``saq.eval.predictions``."""
    values = np.asarray([int(b) for b in bits], dtype=np.uint64).reshape(-1, 1)
    return ((values >> np.arange(n_bits, dtype=np.uint64)) & np.uint64(1)).astype(bool)


def match_table_from_json(coco: dict[str, Any], image_ids: Sequence[int] | None = None) -> MatchTable:
    """Arrays of a stored match table (``evals.<name>.coco``); ``image_ids`` is the pool (default: the
    table's own images), which must hold every image with a detection or ground truth."""
    pool = tuple(int(i) for i in (image_ids if image_ids is not None else coco["image_ids"]))
    index = {img: i for i, img in enumerate(pool)}
    n_area, n_thr = len(coco["areas"]), int(coco["num_thresholds"])
    dets, gts = coco["dets"], coco["gt"]
    missing = {int(i) for i in dets["image_id"] + gts["image_id"]} - set(index)
    if missing:
        raise ValueError(f"{len(missing)} images with detections or ground truth are not in the image pool")
    det_cat = np.asarray(dets["category_id"], dtype=np.int64)
    det_img = np.asarray([index[int(i)] for i in dets["image_id"]], dtype=np.int64)
    scores = np.asarray(dets["score"], dtype=np.float64)
    tp = _unpack(dets["tp"], n_area * n_thr).reshape(-1, n_area, n_thr)
    ignore = _unpack(dets["ignore"], n_area * n_thr).reshape(-1, n_area, n_thr)
    gt_cat = np.asarray(gts["category_id"], dtype=np.int64)
    gt_img = np.asarray([index[int(i)] for i in gts["image_id"]], dtype=np.int64)
    npig = np.asarray(gts["npig"], dtype=np.int64).reshape(-1, n_area)
    categories = []
    for cat in sorted(set(det_cat.tolist()) | set(gt_cat.tolist())):
        rows = np.flatnonzero(det_cat == cat)  # stored in image order, pycocotools' order within an image
        rows = rows[np.argsort(-scores[rows], kind="mergesort")]  # accumulate()'s stable sort
        counts = np.zeros((n_area, len(pool)), dtype=np.int64)
        for g in np.flatnonzero(gt_cat == cat):
            counts[:, gt_img[g]] += npig[g]
        categories.append(CategoryMatches(det_img[rows], tp[rows].transpose(1, 2, 0),
                                          ignore[rows].transpose(1, 2, 0), counts))
    return MatchTable(pool, tuple(categories), n_thr)


def _precision_sums(cat: CategoryMatches, weights: np.ndarray, area: int, thr: np.ndarray) -> np.ndarray:
    """Sum over thresholds and recall points of the interpolated precision, per resample (B,)."""
    if cat.det_image.size == 0:
        return np.zeros(weights.shape[0])
    w = weights[:, cat.det_image][:, None, :]  # B x 1 x D
    ign = cat.ignore[area][thr]
    tp = (cat.tp[area][thr] & ~ign)[None]  # 1 x T x D
    fp = (~cat.tp[area][thr] & ~ign)[None]
    tp_sum = np.cumsum(w * tp, axis=-1)
    fp_sum = np.cumsum(w * fp, axis=-1)
    fp_first = fp_sum - np.maximum(w - 1.0, 0.0) * fp  # a repeated false positive: its first copy
    npig = np.maximum(weights @ cat.npig[area], 1)[:, None, None].astype(np.float64)
    recall = tp_sum / npig
    precision = tp_sum / (fp_first + tp_sum + np.spacing(1))
    envelope = np.maximum.accumulate(precision[..., ::-1], axis=-1)[..., ::-1]
    # pycocotools reads, for each recall threshold r, the envelope at the first point with recall >= r
    # (searchsorted side='left'). Point j is that first point for the thresholds in
    # [above[j-1], above[j]), above[j] = how many thresholds lie at or below recall[j]; thresholds never
    # reached read 0. Only the sum over thresholds is needed: sum_j envelope[j] * (above[j] - above[j-1]).
    above = np.searchsorted(REC_THRS, recall, side="right")
    newly = np.diff(above, axis=-1, prepend=0)
    return (envelope * newly).sum(axis=(1, 2))


def ap_samples(table: MatchTable, weights: np.ndarray, metric: str = "mask_AP") -> np.ndarray:
    """COCO ``metric`` (percent) of each weighted image multiset: ``weights`` is (B, num_images)."""
    area, thr_sel = METRICS[metric]
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if weights.shape[1] != table.num_images:
        raise ValueError(f"weights cover {weights.shape[1]} images, the table's pool has {table.num_images}")
    thr = np.arange(table.num_thresholds) if thr_sel is None else np.asarray(thr_sel)
    largest = max((c.det_image.size for c in table.categories), default=1)
    chunk = max(1, _MAX_CHUNK_ELEMENTS // max(1, largest * len(thr)))
    out = np.empty(weights.shape[0])
    for start in range(0, weights.shape[0], chunk):
        w = weights[start:start + chunk]
        total, valid = np.zeros(w.shape[0]), np.zeros(w.shape[0])
        for cat in table.categories:
            present = (w @ cat.npig[area]) > 0  # a category without countable instances is not averaged
            total += np.where(present, _precision_sums(cat, w, area, thr), 0.0)
            valid += present
        # no category at all: pycocotools reports -1, saq's metrics report 0
        out[start:start + chunk] = np.where(valid > 0, total / np.maximum(valid, 1) / (len(thr) * REC_THRS.size), 0.0)
    return out * 100.0


def coco_ap(table: MatchTable, metric: str = "mask_AP") -> float:
    """``metric`` on the table's whole image pool (each image once)."""
    return float(ap_samples(table, np.ones((1, table.num_images)), metric)[0])


def bootstrap_weights(num_images: int, num_samples: int = 1000, seed: int = 0) -> np.ndarray:
    """(num_samples, num_images) draw counts: each row resamples the images with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(num_samples, num_images))
    offsets = (np.arange(num_samples) * num_images)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=num_samples * num_images)
    return counts.reshape(num_samples, num_images).astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of ``samples``."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def interval_summary(point: float, samples: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """A difference on the full image set with its bootstrap interval and the share of resamples at
    or below 0."""
    low, high = percentile_interval(samples, level)
    return {"delta": float(point), "ci_low": low, "ci_high": high, "level": level,
            "p_le_0": float(np.mean(samples <= 0.0)), "samples": int(samples.size)}


def paired_difference(tables: Sequence[MatchTable], baselines: Sequence[MatchTable], weights: np.ndarray,
                      metric: str = "mask_AP", level: float = 0.95) -> dict[str, Any]:
    """Bootstrap of mean(AP(tables[i]) - AP(baselines[i])) over pairs (e.g. seeds), every pair
    evaluated on the same resampled image multisets (rows of ``weights``)."""
    if len(tables) != len(baselines) or not tables:
        raise ValueError("paired_difference needs one baseline per table (at least one pair)")
    point = np.mean([coco_ap(t, metric) - coco_ap(b, metric) for t, b in zip(tables, baselines)])
    samples = np.mean([ap_samples(t, weights, metric) - ap_samples(b, weights, metric)
                       for t, b in zip(tables, baselines)], axis=0)
    return {**interval_summary(point, samples, level), "pairs": len(tables)}
