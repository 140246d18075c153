"""Auto box prompts from the model itself: mechanics on a random tiny SAM (thresholds opened up)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from saq.data.auto_prompts import _point_grid, auto_box_prompts, model_fingerprint
from saq.data.folder import folder_dataset
from saq.models import build_tiny_sam

# Random weights predict low IoU and unstable masks: let every non-empty mask through.
OPEN = {"pred_iou_thresh": -1e9, "stability_thresh": -1e9, "min_area_frac": 0.0, "show_progress": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model gains nothing from threads; one avoids fighting other jobs for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model():
    return build_tiny_sam().eval()


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 96, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (150, 100), dtype=np.uint8), mode="L").save(folder / "b.png")
    return folder_dataset(folder)


def test_point_grid_is_cell_centres():
    grid = _point_grid(2, 10, 20, torch.device("cpu"))
    assert grid.tolist() == [[5.0, 2.5], [15.0, 2.5], [5.0, 7.5], [15.0, 7.5]]


def test_deterministic_and_well_formed(model, dataset):
    """An independently built model of the same seed, in another global RNG state, gives the same prompts."""
    torch.manual_seed(1)
    first = auto_box_prompts(model, dataset, points_per_side=4, **OPEN)
    torch.manual_seed(2)
    second = auto_box_prompts(build_tiny_sam().eval(), dataset, points_per_side=4, **OPEN)
    assert first == second and set(first) == {1, 2}
    for img in dataset.images:
        prompts = first[img.id]
        assert prompts, "open thresholds must leave at least one mask"
        assert [p.score for p in prompts] == sorted((p.score for p in prompts), reverse=True)
        for p in prompts:
            x0, y0, x1, y1 = p.box_xyxy
            assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
            assert all(isinstance(v, float) for v in p.box_xyxy)
            assert p.category_id == 1 and p.ann_id is None


def test_max_prompts_respected(model, dataset):
    # nms threshold 1.0 suppresses nothing, so the cap is what limits the count.
    capped = auto_box_prompts(model, dataset, points_per_side=4, box_nms_thresh=1.0, max_prompts=5, **OPEN)
    assert all(len(v) == 5 for v in capped.values())
    single = auto_box_prompts(model, dataset, points_per_side=4, max_prompts=1, **OPEN)
    assert all(len(v) == 1 for v in single.values())
    # The single prompt is the best-scoring one that survives NMS, i.e. the overall best.
    assert all(single[k][0] == capped[k][0] for k in single)


def test_impossible_thresholds_give_empty_lists(model, dataset):
    model.train()
    model.mask_decoder.eval()
    prompts = auto_box_prompts(model, dataset, points_per_side=2, pred_iou_thresh=2.0, show_progress=False)
    assert prompts == {1: [], 2: []}
    # The call runs in eval mode but gives every module its own mode back.
    assert model.training and model.image_encoder.training and not model.mask_decoder.training


def test_cache_hit_skips_the_model(model, dataset, tmp_path):
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        cache = tmp_path / "cache"
        fresh = auto_box_prompts(model, dataset, points_per_side=4, cache_dir=cache, **OPEN)
        assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 2
        assert not list(cache.glob("*.tmp"))
        stored = json.loads(next(cache.glob("*.json")).read_text())
        assert stored["params"]["points_per_side"] == 4
        cached = auto_box_prompts(model, dataset, points_per_side=4, cache_dir=cache, **OPEN)
        assert cached == fresh and len(calls) == 2
        # Another threshold is another key: computed again.
        auto_box_prompts(model, dataset, points_per_side=4, cache_dir=cache, **{**OPEN, "min_area_frac": 0.5})
        assert len(calls) == 4 and len(list(cache.glob("*.json"))) == 4
    finally:
        handle.remove()


def test_model_fingerprint_tracks_weights():
    a, b = build_tiny_sam(seed=0), build_tiny_sam(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(build_tiny_sam(seed=1))
    with torch.no_grad():
        b.mask_decoder.iou_prediction_head.layers[0].bias[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
