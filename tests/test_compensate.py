"""Closed-form compensation (saq.ptq.compensate): the ridge step against least squares, the rounding step
against nearest rounding, and the stage on the tiny model (weights on the grid, errors down)."""

import pytest
import torch

from helpers.rules import protocol_rules
from saq.models import build_tiny_sam
from saq.ptq.image_source import ImageSource
from saq.models.predictor import encode_image
from saq.nn import assert_deployable, harden_weights_, quantize_
from saq.ptq.calibrate import calibrate_
from saq.ptq.compensate import compensate_, encoder_segments, gptq_round, relative_output_error, ridge_refit
from saq.quant import QuantMode, QuantSpec, set_quant_mode
from saq.quant.functional import fake_quantize

W4A4 = protocol_rules(QuantSpec(4, granularity="channel"), QuantSpec(4))


def _augmented(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def test_ridge_refit_without_ridge_is_least_squares():
    torch.manual_seed(0)
    x_fp = torch.randn(500, 6, dtype=torch.float64)
    x_q = x_fp + 0.1 * torch.randn_like(x_fp)  # the quantized model's input: the FP input plus an error
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a_q, a_fp = _augmented(x_q), _augmented(x_fp)
    w2, b2 = ridge_refit(w, b, a_q.T @ a_q, a_q.T @ a_fp, ridge=0.0)
    target = a_fp @ torch.cat([w, b[:, None]], 1).T
    expected = torch.linalg.lstsq(a_q, target).solution.T
    assert torch.allclose(torch.cat([w2, b2[:, None]], 1), expected, atol=1e-8)
    # a huge ridge keeps the FP weights
    w3, b3 = ridge_refit(w, b, a_q.T @ a_q, a_q.T @ a_fp, ridge=1e8)
    assert torch.allclose(w3, w, atol=1e-5) and torch.allclose(b3, b, atol=1e-5)


def _grid(w, bits=4):
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = (hi - lo) / (2 ** bits - 1)
    zero = torch.round(-lo / scale)
    return scale, zero


def test_gptq_round_is_on_grid_and_beats_nearest_rounding():
    torch.manual_seed(1)
    w = torch.randn(8, 32, dtype=torch.float64)
    scale, zero = _grid(w)
    mix = torch.randn(32, 32, dtype=torch.float64)
    x = torch.randn(2000, 32, dtype=torch.float64) @ mix  # correlated inputs
    h = x.T @ x
    q = gptq_round(w, h, scale, zero, 0, 15, damp=0.0)
    on_grid = fake_quantize(q, scale[:, None], zero[:, None], 0, 15)
    assert torch.allclose(q, on_grid, atol=1e-12)
    nearest = fake_quantize(w, scale[:, None], zero[:, None], 0, 15)
    assert ((x @ (w - q).T) ** 2).sum() < ((x @ (w - nearest).T) ** 2).sum()
    # uncorrelated inputs (diagonal H): nothing to compensate, nearest rounding
    assert torch.equal(gptq_round(w, torch.eye(32, dtype=torch.float64), scale, zero, 0, 15, damp=0.0), nearest)


def test_gptq_round_in_blocks_matches_column_by_column():
    """block=1 is the plain column-by-column update; larger blocks defer the update of later columns and
    must give the same rounding up to float order (a layer-sized problem, correlated inputs)."""
    torch.manual_seed(3)
    w = torch.randn(48, 300, dtype=torch.float64)
    scale, zero = _grid(w)
    x = torch.randn(3000, 300, dtype=torch.float64) @ torch.randn(300, 300, dtype=torch.float64)
    h = x.T @ x
    reference = gptq_round(w, h, scale, zero, 0, 15, block=1)
    for block in (7, 128, 1000):
        blocked = gptq_round(w, h, scale, zero, 0, 15, block=block)
        codes_differ = ((blocked - reference).abs() > 1e-9).sum().item()
        assert codes_differ <= w.numel() // 1000, f"block={block}: {codes_differ} weights rounded differently"
        assert torch.allclose(x @ blocked.T, x @ reference.T, rtol=1e-3, atol=1e-6 * x.abs().max().item())
    with pytest.raises(ValueError, match="block=0"):
        gptq_round(w, h, scale, zero, 0, 15, block=0)


def test_relative_output_error_from_moments():
    torch.manual_seed(2)
    x_fp = torch.randn(300, 5, dtype=torch.float64)
    x_q = x_fp + 0.2 * torch.randn_like(x_fp)
    w, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    wq, bq = w + 0.1, b - 0.1
    a_q, a_fp = _augmented(x_q), _augmented(x_fp)
    moments = (a_q.T @ a_q, a_q.T @ a_fp, a_fp.T @ a_fp)
    direct = ((x_q @ wq.T + bq - x_fp @ w.T - b) ** 2).sum() / ((x_fp @ w.T + b) ** 2).sum()
    assert relative_output_error(w, b, wq, bq, moments) == pytest.approx(float(direct), rel=1e-9)


def _calibrated(items):
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, W4A4)
    calibrate_(model, items, show_progress=False)
    return model


def _embedding_error(model, fp_model, image):
    with torch.no_grad():
        q, f = encode_image(model, image).embedding, encode_image(fp_model, image).embedding
    return float(((q - f) ** 2).mean() / (f ** 2).mean())


def test_compensate_stage_on_tiny_model(random_calibration_items):
    items = random_calibration_items
    fp_model = build_tiny_sam(seed=2).eval()
    plain = _calibrated(items)
    model = _calibrated(items)
    assert encoder_segments(model) == ["image_encoder.blocks.0", "image_encoder.blocks.1", "image_encoder.neck"]
    info = compensate_(model, items, ridge=0.01, refit=True, inputs="chain", show_progress=False)
    assert info["layers"] > 0
    assert info["mean_relative_output_error_after"] < info["mean_relative_output_error_before"]
    for m in (plain, model):
        harden_weights_(m)
        set_quant_mode(m, QuantMode.QUANTIZE)
    assert_deployable(model)  # every weight on its grid, every quantizer deterministic
    image = ImageSource(model).image(items[0].image.path)
    assert _embedding_error(model, fp_model, image) < _embedding_error(plain, fp_model, image)


def test_compensated_checkpoint_round_trip(random_calibration_items, tmp_path):
    """Layers without a bias (the neck's convs) keep none: the checkpoint loads strictly, same outputs."""
    from saq.export import load_quantized, save_quantized
    from saq.nn.quantize import plan_layout

    items = random_calibration_items
    model = build_tiny_sam(seed=2).eval()
    layout = plan_layout(model, W4A4)
    quantize_(model, W4A4)
    calibrate_(model, items, show_progress=False)
    assert model.image_encoder.neck[0].bias is None
    compensate_(model, items, show_progress=False)
    assert model.image_encoder.neck[0].bias is None
    harden_weights_(model)
    set_quant_mode(model, QuantMode.QUANTIZE)
    path = save_quantized(tmp_path / "quantized.pt", model, layout, {"model": {"name": "tiny"}})
    loaded, _ = load_quantized(path)
    image = ImageSource(model).image(items[0].image.path)
    with torch.no_grad():
        assert torch.equal(encode_image(loaded, image).embedding, encode_image(model, image).embedding)


def test_default_compensation_rounds_only(random_calibration_items):
    """refit off (the default): biases stay, weights only take other grid values (GPTQ's rounding)."""
    items = random_calibration_items
    model = _calibrated(items)
    qkv = model.image_encoder.blocks[0].attn.qkv
    bias, weight = qkv.bias.detach().clone(), qkv.weight.detach().clone()
    info = compensate_(model, items, show_progress=False)
    assert info["refit"] is False and info["inputs"] == "own"
    assert torch.equal(qkv.bias, bias)
    q = qkv.weight_quantizer
    with torch.no_grad():
        assert torch.allclose(qkv.weight, fake_quantize(qkv.weight, q.scale, q.zero_point, q.qmin, q.qmax))
    assert not torch.equal(qkv.weight, weight)
    with pytest.raises(ValueError, match="inputs"):
        compensate_(model, items, inputs="other", show_progress=False)
