"""Bimodal integration (PTQ4SAM's BIG): KDE peaks, sign folding invariance, detection on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling.transformer import Attention

from saq.data.calibration import CalibrationItem
from saq.data.coco import ImageRecord
from saq.data.prompts import Prompt
from saq.models.predictor import encode_image
from saq.models import build_tiny_sam
from saq.nn import QuantRule, quantize_
from saq.ptq import bimodal
from saq.ptq.bimodal import (TOKEN_TO_IMAGE_ATTENTIONS, bimodal_fold_, channel_signs, fold_signs_, is_bimodal,
                             kde_peaks)
from saq.quant import QuantMode, QuantSpec, set_quant_mode

BOX = (10.0, 10.0, 60.0, 80.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kde_peaks_two_gaussians_vs_one():
    mixture = torch.cat([torch.randn(3000, generator=_gen(0)) - 5, torch.randn(3000, generator=_gen(1)) + 5])
    peaks = kde_peaks(mixture)
    assert len(peaks) == 2 and peaks[1] - peaks[0] >= 32
    assert len(kde_peaks(torch.randn(5000, generator=_gen(2)))) == 1
    assert kde_peaks(torch.full((10,), 3.0)) == [0]  # constant: one mode, no NaN bandwidth


def _big_mixture() -> torch.Tensor:
    """120k values (over KDE_MAX_POINTS, so the KDE subsamples), rebuilt from scratch on every call."""
    return torch.cat([torch.randn(60000, generator=_gen(3)) - 4, torch.randn(60000, generator=_gen(4)) + 4])


def test_kde_peaks_subsamples_large_inputs_deterministically():
    """Two independent calls on independently built inputs, with the global RNG in different states,
    give the same density bit for bit: the subsample has its own seed, not torch's global one."""
    torch.manual_seed(123)
    first = bimodal.kde_density(_big_mixture())
    torch.manual_seed(456)
    torch.rand(1000)
    second = bimodal.kde_density(_big_mixture())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    torch.manual_seed(789)
    peaks = kde_peaks(_big_mixture())
    assert kde_peaks(_big_mixture()) == peaks and len(peaks) == 2
    # the seed is what fixes it: another subsample seed gives another density
    other = bimodal.kde_density(_big_mixture(), seed=bimodal.KDE_SEED + 1)
    assert not torch.equal(first[1], other[1])


def test_channel_signs_guards_zero():
    k = torch.tensor([[[1.0, -2.0, 0.0, 3.0]], [[1.0, -2.0, 0.0, -5.0]]])  # channel 3 mean is -1
    assert channel_signs(k).tolist() == [1.0, -1.0, 1.0, -1.0]


def _attention_inputs(dim: int, seed: int):
    g = _gen(seed)
    return (torch.randn(1, 7, dim, generator=g), torch.randn(1, 64, dim, generator=g),
            torch.randn(1, 64, dim, generator=g))


def test_fold_signs_keeps_tiny_token_to_image_attention_output():
    model = build_tiny_sam(seed=0).eval()
    attn = model.get_submodule(TOKEN_TO_IMAGE_ATTENTIONS(model)[0])
    q, k, v = _attention_inputs(attn.embedding_dim, 0)
    with torch.no_grad():
        before = attn(q, k, v)
        signs = torch.where(torch.rand(attn.internal_dim, generator=_gen(1)) < 0.5, -1.0, 1.0)
        weight = attn.k_proj.weight.clone()
        fold_signs_(attn, signs)
        after = attn(q, k, v)
    assert torch.equal(attn.k_proj.weight, weight * signs[:, None])  # rows really flipped
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_folding_removes_synthetic_bimodality():
    attn = Attention(embedding_dim=32, num_heads=2, downsample_rate=2)
    with torch.no_grad():
        attn.k_proj.weight.mul_(0.1)
        attn.k_proj.bias.copy_(torch.where(torch.arange(16) % 3 == 0, -6.0, 6.0))  # channels sit on +-6
    x = torch.randn(2, 256, 32, generator=_gen(5))
    with torch.no_grad():
        k = attn.k_proj(x)
        assert is_bimodal(k)
        q_in = torch.randn(2, 5, 32, generator=_gen(6))
        before = attn(q_in, x, x)
        fold_signs_(attn, channel_signs(k))
        k_folded = attn.k_proj(x)
        after = attn(q_in, x, x)
    assert (k_folded.mean(dim=(0, 1)) >= 0).all()
    assert not is_bimodal(k_folded)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_fold_signs_rejects_bad_signs_and_calibrated_quantizers():
    model = build_tiny_sam(seed=0).eval()
    quantize_(model, [QuantRule("*", QuantSpec(8, granularity="channel"), QuantSpec(8))])
    attn = model.get_submodule(TOKEN_TO_IMAGE_ATTENTIONS(model)[-1])
    with pytest.raises(ValueError):
        fold_signs_(attn, torch.ones(attn.internal_dim + 1))
    with pytest.raises(ValueError):
        fold_signs_(attn, torch.full((attn.internal_dim,), 0.5))
    set_quant_mode(attn, QuantMode.OBSERVE)  # an observer now holds (or will hold) statistics
    with pytest.raises(RuntimeError, match="before calibration"):
        fold_signs_(attn, torch.ones(attn.internal_dim))


def _item(tmp_path) -> CalibrationItem:
    path = tmp_path / "calib.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)).save(path)
    record = ImageRecord(id=0, path=path, width=128, height=96, set_name="synthetic", source_id=0)
    return CalibrationItem(record, [Prompt(BOX, 1.0, 1), Prompt((0.0, 0.0, 127.0, 95.0), 1.0, 1)])


def _decoder_outputs(model, image):
    with torch.no_grad():
        encoded = encode_image(model, image)
        boxes = encoded.transform.apply_boxes_torch(torch.tensor([BOX]), encoded.original_size)
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        return model.mask_decoder(encoded.embedding, model.prompt_encoder.get_dense_pe(), sparse, dense,
                                  multimask_output=False)


def test_token_to_image_attention_names():
    model = build_tiny_sam()
    names = TOKEN_TO_IMAGE_ATTENTIONS(model)
    assert names == ["mask_decoder.transformer.layers.0.cross_attn_token_to_image",
                     "mask_decoder.transformer.layers.1.cross_attn_token_to_image",
                     "mask_decoder.transformer.final_attn_token_to_image"]
    assert all(isinstance(model.get_submodule(n), Attention) for n in names)


def test_bimodal_fold_runs_on_tiny_model(tmp_path):
    model = build_tiny_sam(seed=0).eval()
    quantize_(model, [QuantRule("*", QuantSpec(8, granularity="channel"), QuantSpec(8))])
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = bimodal_fold_(model, _item(tmp_path))
    assert set(result) == set(TOKEN_TO_IMAGE_ATTENTIONS(model))
    assert all(isinstance(v, bool) for v in result.values())
    for name, folded in result.items():
        if not folded:
            assert torch.equal(model.get_submodule(name).k_proj.weight, before[f"{name}.k_proj.weight"])
    for attn_name in result:  # hooks are gone
        assert not model.get_submodule(attn_name).k_proj._forward_hooks


def test_bimodal_fold_all_attentions_keeps_predictions(tmp_path, monkeypatch):
    item = _item(tmp_path)
    image = np.asarray(Image.open(item.image.path).convert("RGB"))
    model = build_tiny_sam(seed=0).eval()
    reference = _decoder_outputs(model, image)
    k_weights = {n: model.get_submodule(n).k_proj.weight.clone() for n in TOKEN_TO_IMAGE_ATTENTIONS(model)}
    monkeypatch.setattr(bimodal, "is_bimodal", lambda k: True)
    result = bimodal_fold_(model, item)
    assert result == {n: True for n in TOKEN_TO_IMAGE_ATTENTIONS(model)}
    changed = [n for n, w in k_weights.items() if not torch.equal(model.get_submodule(n).k_proj.weight, w)]
    assert changed  # with random weights at least one channel mean is negative somewhere
    masks, iou = _decoder_outputs(model, image)
    torch.testing.assert_close(masks, reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(iou, reference[1], rtol=0, atol=1e-5)
