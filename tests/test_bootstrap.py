"""The vectorised COCO AP of resampled image sets equals pycocotools; paired bootstrap intervals."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from helpers.coco_synth import synthetic_coco
from saq.eval.bootstrap import (METRICS, ap_samples, bootstrap_weights, coco_ap, match_table_from_json,
                                paired_difference)
from saq.eval.metrics import coco_mask_ap
from saq.eval.predictions import evaluated_coco, match_table


def _table(gt, dets, image_ids=None):
    stored = json.loads(json.dumps(match_table(evaluated_coco(gt, dets))))  # through JSON, as on disk
    return match_table_from_json(stored, image_ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_set_ap_equals_pycocotools(seed):
    gt, dets = synthetic_coco(seed)
    reference = coco_mask_ap(gt, dets)
    table = _table(gt, dets)
    for metric in METRICS:
        assert coco_ap(table, metric) == pytest.approx(reference[metric], abs=1e-9), metric


def test_resampled_ap_equals_pycocotools_on_the_expanded_image_set():
    """Weights w_i give the AP of the set holding image i w_i times (distinct scores: no tie order)."""
    gt, dets = synthetic_coco(3, tie_scores=False)
    table = _table(gt, dets)
    weights = bootstrap_weights(table.num_images, 3, seed=5)
    for row in weights:
        images, anns, expanded = [], [], []
        for img, count in zip(gt["images"], row.astype(int)):
            for copy in range(count):
                new_id = img["id"] * 100 + copy
                images.append({**img, "id": new_id})
                anns += [{**a, "id": len(anns) + k + 1, "image_id": new_id}
                         for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == img["id"])]
                expanded += [{**d, "image_id": new_id} for d in dets if d["image_id"] == img["id"]]
        reference = coco_mask_ap({**gt, "images": images, "annotations": anns}, expanded)
        for metric in ("mask_AP", "mask_AP50", "mask_APs"):
            assert ap_samples(table, row[None], metric)[0] == pytest.approx(reference[metric], abs=1e-9)


def test_ci_of_a_recipe_against_itself_is_zero():
    gt, dets = synthetic_coco(0)
    table = _table(gt, dets)
    result = paired_difference([table, table], [table, table], bootstrap_weights(table.num_images, 200, 0))
    assert (result["delta"], result["ci_low"], result["ci_high"]) == (0.0, 0.0, 0.0)


def test_clearly_better_recipe_has_a_ci_above_zero():
    gt, dets = synthetic_coco(2, n_images=40, tie_scores=False)
    worse = [d for i, d in enumerate(dets) if i % 3]  # misses a third of its detections
    weights = bootstrap_weights(len(gt["images"]), 300, seed=1)
    result = paired_difference([_table(gt, dets)], [_table(gt, worse)], weights)
    assert result["delta"] > 0 and result["ci_low"] > 0
    again = paired_difference([_table(gt, dets)], [_table(gt, worse)], weights)
    assert again == result  # deterministic for a given seed


def test_pool_must_cover_the_tables_images():
    gt, dets = synthetic_coco(0)
    with pytest.raises(ValueError, match="not in the image pool"):
        _table(gt, dets, image_ids=[img["id"] for img in gt["images"][:3]])


def test_bootstrap_is_fast_at_benchmark_scale():
    """128 images, ~1000 detections, B=1000: well under a second per run."""
    gt, dets = synthetic_coco(4, n_images=128, n_cats=60, tie_scores=False)
    table = _table(gt, dets)
    weights = bootstrap_weights(table.num_images, 1000, 0)
    start = time.perf_counter()
    samples = ap_samples(table, weights)
    assert time.perf_counter() - start < 5.0 and samples.shape == (1000,)
    assert abs(np.mean(samples) - coco_ap(table)) < 5.0


def test_dev_split_ap_is_the_ap_of_its_first_images_by_id():
    """experiments/dev_split.py scores a run on the images data.max_images=N would evaluate."""
    import importlib.util

    from helpers.cli import ROOT

    spec = importlib.util.spec_from_file_location("dev_split", ROOT / "experiments" / "dev_split.py")
    dev_split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev_split)
    gt, dets = synthetic_coco(4, tie_scores=False)
    gt = {**gt, "images": gt["images"][::-1]}  # pool order must not matter, only the ids
    stored = json.loads(json.dumps(match_table(evaluated_coco(gt, dets))))
    table = match_table_from_json(stored, tuple(img["id"] for img in gt["images"]))
    first = 5
    kept = sorted(img["id"] for img in gt["images"])[:first]
    split_gt = {**gt, "images": [i for i in gt["images"] if i["id"] in kept],
                "annotations": [a for a in gt["annotations"] if a["image_id"] in kept]}
    reference = coco_mask_ap(split_gt, [d for d in dets if d["image_id"] in kept])["mask_AP"]
    weights = dev_split.split_weights(table, first, samples=4)
    assert weights.shape == (5, table.num_images) and weights[0].sum() == first
    assert ap_samples(table, weights[:1])[0] == pytest.approx(reference, abs=1e-9)
    assert reference != pytest.approx(coco_ap(table), abs=1e-6)  # the split is not the whole set
