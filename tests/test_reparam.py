"""Channel reparameterization (saq.ptq.reparam): the fold against a direct computation, the FP model
unchanged on the tiny ViT and on a TinyViT (vit_t-shaped, random weights), equal channel ranges after it."""

import pytest
import torch
from torch import nn

from saq.models import build_tiny_sam
from saq.models.build import build_vit_t_architecture
from saq.ptq.image_source import ImageSource
from saq.models.predictor import encode_image
from saq.nn import QuantRule, quantize_
from saq.ptq.calibrate import calibrate_
from saq.ptq.reparam import (channel_ranges, fold_pair_, fold_values_, norm_linear_pairs, reparam_, reparam_factors,
                             value_projections, value_ranges)
from saq.quant import QuantSpec

W4A4 = [QuantRule("prompt_encoder*"), QuantRule("image_encoder.patch_embed*"),
        QuantRule("mask_decoder.output_upscaling*"), QuantRule("mask_decoder.output_hypernetworks_mlps*"),
        QuantRule("mask_decoder.iou_prediction_head*"),
        QuantRule("*", QuantSpec(4, granularity="channel"), QuantSpec(4))]


def test_fold_matches_direct_computation():
    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(6), nn.Linear(6, 5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 3.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(40, 6) * 3
    before_norm = norm(x).detach()
    before = linear(norm(x)).detach()
    r, o = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.5, 0.25]), torch.randn(6)
    fold_pair_(norm, linear, r, o)
    assert torch.allclose(norm(x), (before_norm - o) / r, atol=1e-5)  # x~ = (x - o) / r
    assert torch.allclose(linear(norm(x)), before, atol=1e-5)


def test_factors_equalize_ranges():
    lo, hi = torch.tensor([-1.0, -10.0, 0.0, -0.1]), torch.tensor([1.0, 30.0, 2.0, 0.1])
    r, o = reparam_factors(lo, hi, strength=1.0, shift=True)
    new_lo, new_hi = (lo - o) / r, (hi - o) / r
    assert torch.allclose(new_lo, torch.full_like(lo, float(lo.mean())), atol=1e-5)
    assert torch.allclose(new_hi - new_lo, torch.full_like(lo, float((hi - lo).mean())), atol=1e-5)
    r0, o0 = reparam_factors(lo, hi, strength=0.0, shift=False)
    assert torch.equal(r0, torch.ones(4)) and torch.equal(o0, torch.zeros(4))
    with pytest.raises(ValueError, match="strength"):
        reparam_(build_tiny_sam(), [], strength=2.0)


def _embedding(model, image):
    return encode_image(model, image).embedding


def test_tiny_vit_pairs_and_fp_model_unchanged(random_calibration_items):
    model = build_tiny_sam(seed=3).eval()
    pairs = norm_linear_pairs(model)
    # two blocks: norm1 -> attn.qkv (windows padded after the norm: no shift), norm2 -> mlp.lin1
    assert [(p.norm.split(".")[-1], p.linear.split(".", 3)[-1], p.shift) for p in pairs] == [
        ("norm1", "attn.qkv", False), ("norm2", "mlp.lin1", True)] * 2
    image = ImageSource(model).image(random_calibration_items[0].image.path)
    before = _embedding(model, image).clone()
    info = reparam_(model, random_calibration_items)
    assert info["pairs"] == 4 and info["fp_embedding_relative_error"] < 1e-5
    assert torch.allclose(_embedding(model, image), before, atol=1e-4, rtol=1e-4)
    # the shifted pairs now have one range for every channel on the calibration data
    ranges = channel_ranges(model, [p.norm for p in pairs if p.shift], random_calibration_items)
    for lo, hi in ranges.values():
        assert torch.allclose(hi - lo, (hi - lo).mean().expand_as(lo), rtol=1e-3)
        assert torch.allclose(lo, lo.mean().expand_as(lo), atol=1e-3)


@pytest.fixture(scope="module")
def square_item(tmp_path_factory):
    """A square random image: no padding after resizing. (On a padded image the random-init TinyViT
    amplifies float32 rounding to 1e-2 by itself, the real vit_t does not: see the real-weight test.)"""
    import numpy as np
    from PIL import Image

    from saq.data.calibration import CalibrationItem
    from saq.data.coco import ImageRecord
    from saq.data.prompts import Prompt

    path = tmp_path_factory.mktemp("square") / "0.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
    return CalibrationItem(ImageRecord(id=0, path=path, width=128, height=128, set_name="random", source_id=0),
                           [Prompt((10.0, 12.0, 90.0, 80.0), 1.0, 1)])


@pytest.mark.slow
def test_tinyvit_encoder_pairs_and_fp_model_unchanged(square_item):
    torch.manual_seed(0)
    model = build_vit_t_architecture().eval()
    pairs = norm_linear_pairs(model)
    assert len(pairs) == 20 and all(p.shift for p in pairs)  # 10 attention blocks x (qkv, fc1)
    assert {p.linear.rsplit(".", 1)[-1] for p in pairs} == {"qkv", "fc1"}
    quantize_(model, W4A4)  # the stage runs on the quantized model, before calibration
    info = reparam_(model, [square_item])
    assert info["pairs"] == 20 and info["fp_embedding_relative_error"] < 1e-4


def test_reparam_then_calibrate_quantizes(random_calibration_items):
    """The folded model calibrates and its W4A4 output is finite; ranges of qkv inputs are per tensor."""
    model = build_tiny_sam(seed=3).eval()
    quantize_(model, W4A4)
    reparam_(model, random_calibration_items)
    calibrate_(model, random_calibration_items, show_progress=False)
    qkv = model.image_encoder.blocks[0].attn.qkv
    assert qkv.input_quantizer.scale.numel() == 1
    image = ImageSource(model).image(random_calibration_items[0].image.path)
    assert torch.isfinite(_embedding(model, image)).all()


@pytest.mark.slow
def test_real_vit_t_fp_embedding_unchanged(vit_t_checkpoint, coco8):
    """Real weights and real (padded) photos: the fold keeps the FP image embedding to float32 rounding."""
    from saq.data import dataset_from_config, gt_prompts, select_calibration
    from saq.models.build import build_model

    model = build_model({"name": "vit_t", "checkpoint": str(vit_t_checkpoint)}).eval()
    dataset = dataset_from_config(coco8)
    items = select_calibration(dataset, gt_prompts(dataset), 2, "first")
    info = reparam_(model, items)
    assert info["pairs"] == 20 and info["fp_embedding_relative_error"] < 1e-5


def test_decoder_attention_balance_keeps_fp_and_equalizes(random_calibration_items):
    from saq.ptq.reparam import decoder_attentions, projection_ranges

    model = build_tiny_sam(seed=3).eval()
    attentions = decoder_attentions(model)
    assert len(attentions) == 7  # 2 layers x 3 attentions + the final token-to-image attention
    info = reparam_(model, random_calibration_items, attention=True)
    assert info["fp_mask_logits_relative_error"] < 1e-5 and set(info["attentions"]) == set(attentions)
    peaks = projection_ranges(model, attentions, random_calibration_items)
    for name in attentions:  # after the fold: q and k share each channel's range, v's channels one range
        assert torch.allclose(peaks[f"{name}.q_proj"], peaks[f"{name}.k_proj"], rtol=1e-3)
        v = peaks[f"{name}.v_proj"]
        assert torch.allclose(v, v.mean().expand_as(v), rtol=1e-3)


def test_tinyvit_value_fold_matches_direct_computation():
    """TinyViT lays qkv's output out per head as [q, k, v]; v~ = (v - o) / r in those rows, undone in the
    output projection, leaves the attention's output unchanged and gives exactly the rescaled v."""
    from mobile_sam.modeling.tiny_vit_sam import Attention

    torch.manual_seed(0)
    attention = Attention(dim=16, key_dim=4, num_heads=2, attn_ratio=2, resolution=(3, 3))  # d = 8
    attention.eval()  # (its train() returns None)
    root = nn.Module()
    root.encoder = attention
    (pair,) = value_projections(root, prefix="encoder")
    assert pair.value_rows == tuple(range(8, 16)) + tuple(range(24, 32))  # head h: rows h*16 + [8, 16)
    x = torch.randn(2, 9, 16)
    before = attention(x)
    v_before = attention.qkv(attention.norm(x)).view(2, 9, 2, -1)[..., 8:].reshape(2, 9, 16)
    r, o = torch.rand(16) + 0.5, torch.randn(16)
    fold_values_(attention.qkv, attention.proj, pair.value_rows, r, o)
    v_after = attention.qkv(attention.norm(x)).view(2, 9, 2, -1)[..., 8:].reshape(2, 9, 16)
    assert torch.allclose(v_after, (v_before - o) / r, atol=1e-5)
    assert torch.allclose(attention(x), before, atol=1e-5)


def test_vit_value_equalization_keeps_fp_and_equalizes(random_calibration_items):
    """SAM ViT blocks ([q, k, v] of C channels each): with ``values`` every attention's v channels end with
    one range on the calibration data and the FP embedding is unchanged."""
    model = build_tiny_sam(seed=3).eval()
    pairs = value_projections(model)
    assert len(pairs) == 2 and all(p.value_rows[0] == 2 * len(p.value_rows) for p in pairs)
    image = ImageSource(model).image(random_calibration_items[0].image.path)
    before = _embedding(model, image).clone()
    info = reparam_(model, random_calibration_items, values=True)
    assert info["value_projections"] == 2 and info["fp_embedding_relative_error"] < 1e-5
    assert torch.allclose(_embedding(model, image), before, atol=1e-4, rtol=1e-4)
    for lo, hi in value_ranges(model, pairs, random_calibration_items, ImageSource(model)).values():
        assert torch.allclose(hi - lo, (hi - lo).mean().expand_as(lo), rtol=1e-3)
        assert torch.allclose(lo, lo.mean().expand_as(lo), atol=1e-3)
