"""Side-by-side PNG of FP vs quantized masks."""

import sys

import numpy as np
import pytest
from PIL import Image

from saq.eval.metrics import encode_mask
from saq.eval.visualize import rle_to_mask, save_side_by_side


def _inputs(n: int, height: int = 60, width: int = 80):
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    boxes, fp, q = [], [], []
    for i in range(n):
        box = (2.0 + i, 3.0, width / 2 + i, height / 2)
        mask = np.zeros((height, width), bool)
        mask[3:height // 2, 2 + i:width // 2 + i] = True
        boxes.append(box)
        fp.append(mask)
        q.append(np.roll(mask, 2, axis=1))
    return image, boxes, fp, q


def test_rows_and_panels(tmp_path):
    sizes = {}
    for n in (1, 3, 6):
        image, boxes, fp, q = _inputs(n)
        out = save_side_by_side(tmp_path / "sub" / f"{n}.png", image, boxes, fp, q, "w4a8", [0.9] * n, max_prompts=4)
        with Image.open(out) as png:
            png.verify()
        with Image.open(out) as png:
            sizes[n] = png.size
    (w1, h1), (w3, h3), (w6, h6) = sizes[1], sizes[3], sizes[6]
    assert w1 == w3 == w6
    # Three panels of the image's aspect (80x60) side by side, plus a title band above each row.
    assert abs(w1 / (h1 - 30) - 3 * 80 / 60) < 0.05
    assert abs(h3 - 3 * h1) <= 3  # one fixed-height row per prompt
    assert abs(h6 - 4 * h1) <= 4  # capped at max_prompts rows


def test_big_image_is_downscaled_and_no_pyplot_state(tmp_path):
    image, boxes, fp, q = _inputs(2, height=1500, width=2000)
    out = save_side_by_side(tmp_path / "big.png", image, boxes, fp, q)
    with Image.open(out) as png:
        assert max(png.size) <= 1000
    assert out.stat().st_size < 2_000_000
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()  # nothing registered with pyplot


def test_grayscale_no_prompts_and_mismatches(tmp_path):
    gray = np.zeros((20, 30), np.uint8)
    out = save_side_by_side(tmp_path / "none.png", gray, [], [], [])
    with Image.open(out) as png:
        assert png.size[0] > png.size[1]
    image, boxes, fp, q = _inputs(2)
    with pytest.raises(ValueError, match="per box"):
        save_side_by_side(tmp_path / "x.png", image, boxes, fp, q[:1])
    with pytest.raises(ValueError, match="does not match"):
        save_side_by_side(tmp_path / "x.png", image, boxes[:1], [fp[0][:10]], q[:1])


def test_rle_round_trip():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 1:8] = True
    rle = encode_mask(mask)  # counts as str
    assert isinstance(rle["counts"], str)
    decoded = rle_to_mask(rle)
    assert decoded.dtype == bool and (decoded == mask).all()
    assert (rle_to_mask({**rle, "counts": rle["counts"].encode()}) == mask).all()
    # Uncompressed RLE runs go down the columns: 1 off, 2 on, 1 off.
    assert rle_to_mask({"size": [2, 2], "counts": [1, 2, 1]}).tolist() == [[False, True], [True, False]]


def test_ap_bars_one_per_row_with_a_value(tmp_path):
    from saq.eval.plots import plot_ap_per_row

    rows = [{"model": "vit_t", "quant": "fp32", "recipe": "fp", "mask_AP": 63.4},
            {"model": "vit_t", "quant": "w4a4", "recipe": "saq_sam", "variant": "ptq.pcc.theta=0.3", "mask_AP": 38.1},
            {"state": "failed", "run_dir": "x"}]  # a failed run has no AP and no bar
    path = plot_ap_per_row(rows, tmp_path / "table.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.height > 50
    assert "pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    with pytest.raises(ValueError, match="no row has 'mask_AP'"):
        plot_ap_per_row(rows[2:], tmp_path / "none.png")
