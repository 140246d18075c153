"""LogSoftmaxQuantizer (PTQ4SAM's AGQ): values, level set, zeros, calibration, checkpoints, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from saq.data.calibration import CalibrationItem
from saq.data.coco import ImageRecord
from saq.data.prompts import Prompt
from saq.models.predictor import decode_boxes, encode_image
from saq.models import build_tiny_sam
from saq.nn import QuantRule, harden_weights_, quantize_
from saq.nn.deploy import assert_deployable
from saq.ptq.calibrate import calibrate_
from saq.quant import QuantMode, QuantSpec, iter_quantizers
from saq.quant.log_quantizer import AGQObserver, LogSoftmaxQuantizer
from saq.quant.factory import make_quantizer
from saq.quant.quantizer import Role

LOG4 = QuantSpec(4, quantizer="log", observer="agq")
# The prompt encoder stays FP (its mask branch never runs with box prompts, like the project's rules).
RULES = [QuantRule("prompt_encoder*"),
         QuantRule("*", QuantSpec(8, granularity="channel"), QuantSpec(8), softmax=LOG4)]


def _quantizer(bits: int = 4, scale: float = 1.0, tau: float = 2.0) -> LogSoftmaxQuantizer:
    q = LogSoftmaxQuantizer(QuantSpec(bits, quantizer="log", observer="agq"), Role.ACTIVATION)
    q.set_params(scale, tau)
    q.set_mode(QuantMode.QUANTIZE)
    return q


def _softmax_maps(seed: int, shape=(2, 3, 8, 16), temperature: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * temperature).softmax(dim=-1)


def test_values_by_hand():
    q = _quantizer(bits=4, scale=1.0, tau=2.0)
    a = torch.tensor([1.0, 0.5, 2.0**-8, 2.0**-7.5, 0.6, 2.0, 0.0])
    expected = torch.tensor([1.0, 0.5, 0.0, 2.0**-7.5, 2.0**-0.5, 1.0, 0.0])
    torch.testing.assert_close(q(a), expected, rtol=1e-6, atol=0.0)
    # code 16 >= 2^4 and exact zeros both get the "zero" code 2^b
    assert q.int_codes(a).tolist() == [0.0, 2.0, 16.0, 15.0, 1.0, 0.0, 16.0]


@pytest.mark.parametrize("scale,tau,bits", [(1.0, 2.0, 4), (0.3, 1.0, 4), (0.8, 4.0, 6), (0.05, 3.0, 8)])
def test_inference_path_equals_the_differentiable_path_bit_for_bit(scale, tau, bits):
    """Without autograd the quantizer runs in place on one buffer; it must give exactly what the
    differentiable path gives (zeros, saturation and the zero code included)."""
    q = _quantizer(bits=bits, scale=scale, tau=tau)
    maps = _softmax_maps(bits, shape=(4, 2, 32, 64), temperature=6.0)
    maps[0, 0, 0, :5] = 0.0
    maps[1, 0, 0, 0] = 2.0 * scale  # above the scale: saturates at code 0
    with torch.no_grad():
        fast = q(maps)
    slow = q(maps.clone().requires_grad_(True))
    assert slow.requires_grad and torch.equal(fast, slow.detach())
    assert (fast == 0).any() and (fast == q.levels()[-1]).any()
    q.inference_path = False  # what the overhead benchmark times as "before"
    with torch.no_grad():
        assert torch.equal(q(maps), fast)
    from saq.quant.log_quantizer import fused_log_fake_quantize

    q.inference_path, q.fused = True, fused_log_fake_quantize()  # runtime.compile
    with torch.no_grad():
        assert torch.equal(q(maps), fast)


def test_outputs_stay_in_level_set():
    for tau in (1.0, 2.0, 4.0):
        q = _quantizer(bits=4, scale=0.7, tau=tau)
        levels = q.levels()
        assert levels.numel() == 2**4 + 1 and levels[0] == 0 and math.isclose(float(levels[-1]), 0.7, rel_tol=1e-6)
        out = q(_softmax_maps(int(tau)))
        assert torch.isclose(out.reshape(-1, 1), levels.reshape(1, -1), rtol=1e-6, atol=0.0).any(dim=1).all()


def test_zero_input_is_finite_forward_and_backward():
    q = _quantizer(bits=4, scale=0.5, tau=2.0)
    q.scale.requires_grad_(True)
    a = torch.tensor([0.0, 0.0, 1e-40, 0.25, 0.5, 0.9], requires_grad=True)
    out = q(a)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(q.scale.grad).all()
    assert a.grad[0] == 0 and a.grad[3] > 0  # STE: gradient ~ a^/a on kept values


def _observe(q: LogSoftmaxQuantizer, pairs) -> None:
    q.set_mode(QuantMode.OBSERVE)
    with torch.no_grad():
        for attn, v in pairs:
            assert torch.equal(q(attn, v), attn)  # observing never changes the map


def test_calibration_picks_a_tau_and_positive_scale():
    q = LogSoftmaxQuantizer(LOG4, Role.ACTIVATION)
    g = torch.Generator().manual_seed(0)
    pairs = [(_softmax_maps(i), torch.randn(2, 3, 16, 4, generator=g)) for i in range(3)]
    _observe(q, pairs)
    observer = q.observer
    assert observer.num_updates == 3
    errors = observer.total_errors()
    q.finalize_observer()
    assert q.observer is None and q.is_calibrated
    assert float(q.tau) in (1.0, 2.0, 4.0) and float(q.scale) > 0
    assert errors[float(q.tau)] == min(errors.values())
    ti = observer.taus.index(float(q.tau))
    expected = torch.stack(observer.best_scales)[:, ti].mean()
    assert math.isclose(float(q.scale), float(expected), rel_tol=1e-6)


def test_calibration_picks_the_tau_that_represents_the_map():
    # Every value is s * 2^(-k/4) with s = max(a): exact at tau = 4 and s = max (the last grid
    # candidate); no scale makes the 2^(-1/4) ratios representable with tau = 1 or 2.
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 12, (4, 6, 10), generator=g).float()
    codes[..., 0] = 0.0
    attn = 0.8 * torch.exp2(-codes / 4)
    values = torch.randn(4, 10, 5, generator=g)
    spec = QuantSpec(4, quantizer="log", observer="agq", observer_kwargs={"grid": 20})
    q = LogSoftmaxQuantizer(spec, Role.ACTIVATION)
    _observe(q, [(attn, values)])
    errors = q.observer.total_errors()
    q.finalize_observer()
    assert float(q.tau) == 4.0
    assert errors[4.0] < 1e-8 < min(errors[1.0], errors[2.0])
    assert math.isclose(float(q.scale), 0.8, rel_tol=1e-5)
    q.set_mode(QuantMode.QUANTIZE)
    torch.testing.assert_close(q(attn), attn, rtol=1e-5, atol=0.0)


def test_search_memory_blocks_do_not_change_the_result():
    attn, values = _softmax_maps(3), torch.randn(2, 3, 16, 4, generator=torch.Generator().manual_seed(3))
    results = []
    for chunk in (10**9, 7):  # whole tensor at once vs. row blocks of one map
        obs = AGQObserver(4, grid=10, chunk_elems=chunk)
        obs.update(attn, values)
        results.append((obs.best(), obs.total_errors()))
    assert results[0][0][0] == results[1][0][0]
    assert math.isclose(results[0][0][1], results[1][0][1], rel_tol=1e-6)
    for tau, err in results[0][1].items():
        assert math.isclose(err, results[1][1][tau], rel_tol=1e-4)


def _reference_candidate_errors(attn, bits, tau, cands):
    from saq.quant.log_quantizer import _log_dequantize, _safe_log2

    log2_a, is_zero = _safe_log2(attn)
    return [_log_dequantize(log2_a, is_zero, torch.log2(c), tau, 2**bits, torch.round) - attn for c in cands]


def _search_inputs(bits):
    attn = _softmax_maps(4, shape=(3, 12, 20), temperature=8.0)
    attn[0, :, :3] = 0.0  # exact zeros
    attn[1, 0, 0] = 1.0  # saturates at the smallest candidate scales
    amax = attn.max()
    lo = torch.minimum(0.01 * amax, torch.full_like(amax, 0.1))
    return attn, lo + (amax - lo) * torch.linspace(0.0, 1.0, 12)


@pytest.mark.parametrize("bits,tau", [(4, 1.0), (4, 2.0), (8, 4.0), (4, 0.5), (4, 1.5), (6, 3.0)])
def test_search_candidate_errors_equal_the_dequantizer_bit_for_bit(bits, tau):
    """The search's in-place candidate error equals ``_log_dequantize(...) - a`` exactly (exact zeros in
    the map, codes past 2^b and saturated codes included); powers of two (the default taus) take the
    shorter path, other taus the general one."""
    import math

    from saq.quant.log_quantizer import _candidate_error_, _candidate_error_pow2_, _safe_log2

    attn, cands = _search_inputs(bits)
    log2_a, is_zero = _safe_log2(attn)
    neg_log2_a = (-log2_a).masked_fill_(is_zero, math.inf)
    tau_log2_a = (log2_a * tau).masked_fill_(is_zero, -math.inf)
    for c, reference in zip(cands, _reference_candidate_errors(attn, bits, tau, cands)):
        general = _candidate_error_(torch.empty_like(attn), torch.empty_like(attn), neg_log2_a, attn,
                                    torch.log2(c), tau, 2**bits)
        assert torch.equal(general, reference)
        if math.frexp(tau)[0] == 0.5:
            short = _candidate_error_pow2_(torch.empty_like(attn), tau_log2_a, attn, torch.log2(c), tau, 2**bits)
            assert torch.equal(short, reference)


def test_lp_sum_matches_pow_closely_and_squares_exactly():
    from saq.quant.log_quantizer import _lp_sum_

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-2
    x[:5] = 0.0
    reference = x.abs().pow(2.4).sum()
    assert math.isclose(float(_lp_sum_(x.clone(), 2.4)), float(reference), rel_tol=1e-6)
    assert float(_lp_sum_(x.clone(), 2.4)) != 0.0
    assert torch.equal(_lp_sum_(x.clone(), 2.0), x.square().sum())


@pytest.mark.parametrize("bits,taus", [(4, (1.0, 2.0, 4.0)), (8, (1.0, 2.0, 4.0)), (4, (0.5, 1.5, 3.0))])
def test_search_picks_the_reference_tau_and_scale(bits, taus):
    """The observer's errors are the reference's (the dequantizer's error through V, |.|^2.4 by pow) to 1e-5,
    and its choice of scale per tau, and of tau, is the reference's."""
    attn, cands = _search_inputs(bits)
    values = torch.randn(3, 20, 5, generator=torch.Generator().manual_seed(4))
    obs = AGQObserver(bits, taus=taus, grid=12)
    obs.update(attn, values)
    reference = torch.stack([torch.stack([(err @ values).abs().pow(2.4).sum()
                                          for err in _reference_candidate_errors(attn, bits, tau, cands)])
                             for tau in taus]) / (3 * 12 * 5)
    best_err, best_idx = reference.min(dim=1)
    torch.testing.assert_close(obs.total_error, best_err, rtol=1e-5, atol=0.0)
    assert torch.equal(obs.best_scales[0], cands[best_idx])
    assert obs.best()[0] == taus[int(best_err.argmin())]


def test_observe_without_values_raises():
    q = LogSoftmaxQuantizer(LOG4, Role.ACTIVATION)
    q.set_mode(QuantMode.OBSERVE)
    with pytest.raises(ValueError, match="quantizer\\(attn, v\\)"):
        q(_softmax_maps(0))


def test_quantize_before_calibration_raises_and_wrong_observer_rejected():
    q = LogSoftmaxQuantizer(LOG4, Role.ACTIVATION)
    assert not q.is_calibrated
    q.set_mode(QuantMode.QUANTIZE)
    with pytest.raises(RuntimeError, match="never calibrated"):
        q(_softmax_maps(0))
    with pytest.raises(ValueError, match="agq"):
        LogSoftmaxQuantizer(QuantSpec(4, quantizer="log", observer="minmax"), Role.ACTIVATION)


def test_qdrop_keeps_some_fp_values_only_in_training():
    q = _quantizer(bits=2, scale=1.0, tau=1.0)
    attn = _softmax_maps(5, shape=(4, 32, 32))
    q.drop_prob = 0.5
    q.train()
    mixed = q(attn)
    assert (mixed == attn).any() and (mixed != attn).any()
    q.eval()
    assert torch.equal(q(attn), _quantizer(bits=2, scale=1.0, tau=1.0)(attn))


def test_state_dict_round_trip_into_fresh_quantizer():
    q = _quantizer(bits=4, scale=0.3, tau=4.0)
    fresh = LogSoftmaxQuantizer(LOG4, Role.ACTIVATION)
    assert fresh.tau.numel() == 0 and fresh.scale.numel() == 0
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_calibrated
    assert fresh.tau.shape == () and float(fresh.tau) == 4.0
    assert math.isclose(float(fresh.scale), 0.3, rel_tol=1e-7)
    fresh.set_mode(QuantMode.QUANTIZE)
    attn = _softmax_maps(2)
    assert torch.equal(fresh(attn), q(attn))
    assert "tau=4" in repr(fresh) and "4-bit" in repr(fresh)


def _calibration_items(tmp_path) -> list[CalibrationItem]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)).save(path)
        record = ImageRecord(id=i, path=path, width=128, height=96, set_name="synthetic", source_id=i)
        prompts = [Prompt((10.0, 10.0, 60.0, 80.0), 1.0, 1), Prompt((30.0, 5.0, 120.0, 90.0), 1.0, 1)]
        items.append(CalibrationItem(record, prompts))
    return items


def test_make_quantizer_and_end_to_end_calibration(tmp_path):
    assert isinstance(make_quantizer(LOG4, Role.ACTIVATION), LogSoftmaxQuantizer)
    model = build_tiny_sam(seed=0).eval()
    quantize_(model, RULES)
    log_quantizers = {n: q for n, q in iter_quantizers(model) if isinstance(q, LogSoftmaxQuantizer)}
    assert len(log_quantizers) == 2 + 7  # 2 encoder blocks + 7 decoder attentions
    assert all(n.endswith("softmax_quantizer") for n in log_quantizers)

    items = _calibration_items(tmp_path)
    calibrate_(model, items, show_progress=False)
    for q in log_quantizers.values():
        assert q.is_calibrated and q.observer is None and q.mode is QuantMode.QUANTIZE
        assert float(q.tau) in (1.0, 2.0, 4.0) and float(q.scale) > 0
    harden_weights_(model)
    assert_deployable(model)  # includes the log quantizers' tau checks

    image = np.asarray(Image.open(items[0].image.path).convert("RGB"))
    masks, iou = decode_boxes(model, encode_image(model, image), torch.tensor([[10.0, 10.0, 60.0, 80.0]]))
    assert masks.shape == (1, 96, 128) and torch.isfinite(iou).all()

    # a checkpoint of the calibrated model restores into a freshly quantized one
    fresh = build_tiny_sam(seed=0).eval()
    quantize_(fresh, RULES)
    fresh.load_state_dict(model.state_dict())
    restored = dict(iter_quantizers(fresh))
    for name, q in log_quantizers.items():
        assert torch.equal(restored[name].tau, q.tau) and torch.equal(restored[name].scale, q.scale)


def test_sampled_search_estimates_the_full_search():
    """max_maps: the error is estimated on a seeded sample of the forward's maps; with every map kept it
    is the exact search, and a sample of half the maps picks the same tau and a nearby scale."""
    g = torch.Generator().manual_seed(5)
    attn = torch.softmax(torch.randn(64, 4, 16, 16, generator=g) * 3, dim=-1)
    values = torch.randn(64, 4, 16, 8, generator=g)
    full, same, half = AGQObserver(4, grid=20), AGQObserver(4, grid=20, max_maps=256), AGQObserver(4, grid=20, max_maps=128)
    for obs in (full, same, half):
        obs.update(attn, values)
    assert same.best() == full.best() and same.total_errors() == full.total_errors()
    assert half.best()[0] == full.best()[0]
    assert math.isclose(half.best()[1], full.best()[1], rel_tol=0.1)
    assert half.total_errors() != full.total_errors()  # it did sample
    again = AGQObserver(4, grid=20, max_maps=128)
    again.update(attn, values)
    assert again.total_errors() == half.total_errors()  # seeded
    with pytest.raises(ValueError, match="max_maps"):
        AGQObserver(4, max_maps=0)


@pytest.mark.parametrize("recipe,expected", [("ptq4sam_s", 16), ("minmax", None)])
def test_benchmark_sets_the_agq_sample_for_every_agq_recipe(recipe, expected):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saq.cli.task import config_dir, register_resolvers
    from saq.ptq.recipe import rules_from_config

    register_resolvers()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("ptq", overrides=["experiment=vit_t_coco", f"ptq={recipe}", "quant=w4a4"])
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    softmax = [r.softmax for r in rules_from_config(c["quant"], c["ptq"]) if r.softmax is not None]
    if expected is None:  # no log quantizer: nothing receives the setting
        assert all(s.observer != "agq" and "max_maps" not in s.observer_kwargs for s in softmax)
        return
    assert softmax and {s.observer for s in softmax} == {"agq"}
    assert {s.observer_kwargs.get("max_maps") for s in softmax} == {expected}
