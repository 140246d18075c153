"""Perceptual-Consistency Clipping: the focus-overlap metric, the candidates, and the greedy search."""

import json

import pytest
import torch
from PIL import Image

from helpers.rules import w4a4
from saq.data import dataset_from_config, gt_prompts, select_calibration
from saq.ptq.pcc_plots import save_pcc_plots
from saq.models import build_tiny_sam
from saq.nn import quantize_
from saq.ptq.calibrate import calibrate_
from saq.ptq.pcc import (DECODER_ATTENTIONS, DEFAULT_PERCENTILES, PCC_POINTS, attention_focus, best_candidate,
                         clip_candidates, focus_overlap_loss, pcc_search_)
from saq.quant import QuantMode, compute_qparams, iter_quantizers
from saq.utils.loggers import RunLogger

RULES = w4a4(observer="minmax")
PASSES = 2


# metric -------------------------------------------------------------------------------------------
def test_focus_is_above_theta_times_row_max():
    a = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    assert attention_focus(a, 0.5).tolist() == [[False, True, True], [True, True, True]]


def test_overlap_loss_identical_disjoint_and_partial():
    a = torch.softmax(torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float(focus_overlap_loss(a, a)) == pytest.approx(0.0, abs=1e-5)
    fp = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])  # focus {0}
    q = torch.tensor([[[[0.0, 1.0, 0.0, 0.0]]]])  # focus {1}
    assert float(focus_overlap_loss(fp, q)) == pytest.approx(1.0)
    fp = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])  # focus {0, 1}
    q = torch.tensor([[[[0.0, 1.0, 1.0, 0.0]]]])  # focus {1, 2}: IoU 1/3
    assert float(focus_overlap_loss(fp, q)) == pytest.approx(2.0 / 3.0, abs=1e-6)
    # mean over (prompt, head): one identical map and one disjoint one
    fp = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 0.0]]]])
    q = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])
    assert float(focus_overlap_loss(fp, q)) == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(ValueError, match="shape"):
        focus_overlap_loss(fp, q[:1])


# candidates ---------------------------------------------------------------------------------------
def test_default_percentiles():
    assert len(DEFAULT_PERCENTILES) == 30 and DEFAULT_PERCENTILES[-1] == 1.0
    assert list(DEFAULT_PERCENTILES) == sorted(set(DEFAULT_PERCENTILES))
    assert DEFAULT_PERCENTILES[0] == 0.85 and 0.99999 in DEFAULT_PERCENTILES


def test_clip_candidates_min_max_and_monotone():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1)) * 3.0
    candidates = clip_candidates(x, DEFAULT_PERCENTILES)
    p, lo, hi = candidates[-1]
    assert p == 1.0 and float(lo) == float(x.min()) and float(hi) == float(x.max())
    los = [float(c[1]) for c in candidates]
    his = [float(c[2]) for c in candidates]
    assert all(a >= b for a, b in zip(los, los[1:])) and all(a <= b for a, b in zip(his, his[1:]))
    assert all(lo_ < hi_ for lo_, hi_ in zip(los, his))
    with pytest.raises(ValueError):
        clip_candidates(x, [0.4])


def test_clip_candidates_beyond_torch_quantile_limit():
    x = torch.zeros(2**24 + 5)
    x[0], x[-1] = -2.0, 3.0
    (p, lo, hi), (_, lo9, hi9) = clip_candidates(x, [1.0, 0.9])
    assert (float(lo), float(hi)) == (-2.0, 3.0) and (float(lo9), float(hi9)) == (0.0, 0.0)


def test_best_candidate_prefers_less_clipping_on_ties():
    assert best_candidate([0.9, 0.99, 1.0], [0.2, 0.1, 0.1]) == 2  # 1.0 wins the tie
    assert best_candidate([0.9, 0.99, 1.0], [0.05, 0.1, 0.1]) == 0


# search -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def items(coco8):
    ds = dataset_from_config(coco8)
    return select_calibration(ds, gt_prompts(ds), 2, "first", max_prompts_per_image=4)


@pytest.fixture(scope="module")
def searched(items):
    """A calibrated tiny model (some quantizers OFF beforehand), searched once, with call counts."""
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    calibrate_(model, items, show_progress=False)
    for i, (_, q) in enumerate(iter_quantizers(model)):
        if i % 3 == 0:  # a mix of modes, so restoring is not just "everything QUANTIZE"
            q.set_mode(QuantMode.OFF)
    modes = {n: q.mode for n, q in iter_quantizers(model)}
    counts = {"encoder": 0, "decoder": 0}
    hooks = [model.image_encoder.register_forward_hook(lambda *_: counts.__setitem__("encoder", counts["encoder"] + 1)),
             model.mask_decoder.register_forward_hook(lambda *_: counts.__setitem__("decoder", counts["decoder"] + 1))]
    result = pcc_search_(model, items, passes=PASSES, show_progress=False)
    for h in hooks:
        h.remove()
    return model, result, modes, counts


def test_decoder_attentions_in_method_order(searched):
    model, *_ = searched
    layer = "mask_decoder.transformer.layers"
    assert DECODER_ATTENTIONS(model) == [f"{layer}.{i}.{kind}" for i in range(2) for kind in
                                         ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")] \
        + ["mask_decoder.transformer.final_attn_token_to_image"]


def test_records_cover_every_pass_module_and_point_in_order(searched, tmp_path):
    model, result, *_ = searched
    expected = [(p, m, q) for p in range(PASSES) for m in DECODER_ATTENTIONS(model) for q in PCC_POINTS]
    assert [(r.pass_index, r.module, r.point) for r in result.records] == expected
    for r in result.records:
        assert r.percentiles == list(DEFAULT_PERCENTILES) and len(r.losses) == len(r.percentiles)
        assert all(0.0 <= v <= 1.0 for v in r.losses)
        assert r.loss_chosen <= r.loss_no_clip  # p = 1 is a candidate
        assert r.loss_chosen == min(r.losses) and r.chosen_p in r.percentiles
        assert r.chosen_range[0] <= r.chosen_range[1] and r.mse_range[0] <= r.mse_range[1]
        assert r.initial_range[0] <= 0.0 <= r.initial_range[1]
        # every clip candidate is a pair of quantiles of the searched input: inside its min-max range
        assert r.minmax_range[0] <= r.chosen_range[0] and r.chosen_range[1] <= r.minmax_range[1]
        if r.chosen_p == 1.0:
            assert r.chosen_range == pytest.approx(r.minmax_range)
    assert len(json.loads(json.dumps(result.to_json()))["records"]) == len(expected)  # serialisable as is
    rows = result.table_rows()
    assert len(rows) == len(expected)
    for row, r in zip(rows, result.records):  # one row per record, its own values, in record order
        assert (row["pass"], row["module"], row["point"], row["chosen_p"]) == (r.pass_index, r.module, r.point,
                                                                               r.chosen_p)
        assert (row["chosen_lo"], row["chosen_hi"], row["mse_lo"], row["mse_hi"]) == (*r.chosen_range, *r.mse_range)
        assert (row["loss_no_clip"], row["loss_chosen"]) == (r.loss_no_clip, r.loss_chosen)
    RunLogger(tmp_path).log_table("pcc", rows)
    (logged,) = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == {"step": None, "pcc": rows}  # the table reaches log.jsonl whole, values unchanged


def test_modes_restored_and_chosen_ranges_set(searched):
    model, result, modes, _ = searched
    assert {n: q.mode for n, q in iter_quantizers(model)} == modes
    for r in result.last_pass():
        q = model.get_submodule(r.module).get_submodule(r.point)
        expected = compute_qparams(torch.tensor(r.chosen_range[0]), torch.tensor(r.chosen_range[1]),
                                   q.spec.bits, q.spec.symmetric)
        assert torch.allclose(q.scale, expected.scale) and torch.equal(q.zero_point, expected.zero_point)


def test_encoder_runs_once_per_item_and_candidates_run_only_the_attention(searched, items):
    model, result, _, counts = searched
    assert counts["encoder"] == len(items)
    # one FP reference run + one input capture per (pass, module); never one per candidate
    assert counts["decoder"] == len(items) * (1 + PASSES * len(DECODER_ATTENTIONS(model)))


def test_plots_are_written(searched, tmp_path):
    _, result, *_ = searched
    paths = save_pcc_plots(result, tmp_path)
    assert len(paths) == len(result.last_pass()) + 1
    for path in paths:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size[0] > 100 and img.size[1] > 100


def test_errors(items):
    model = build_tiny_sam(seed=2).eval()
    with pytest.raises(ValueError, match="no quantized mask-decoder attention"):
        pcc_search_(model, items, show_progress=False)
    quantize_(model, RULES)
    with pytest.raises(ValueError, match="at least one calibration item"):
        pcc_search_(model, [], show_progress=False)


def test_pcc_before_the_observers_keeps_its_ranges_through_calibration(items):
    """Reference order: PCC on the uncalibrated model (only its own points on), then the observers
    calibrate everything else and leave the searched ranges untouched."""
    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    result = pcc_search_(model, items[:1], percentiles=(0.9, 0.99, 1.0), passes=1, show_progress=False)
    searched = {f"{r.module}.{r.point}": r.chosen_range for r in result.records}
    assert searched and all(r.initial_range == r.minmax_range for r in result.records)
    calibrate_(model, items, show_progress=False, keep_calibrated=True)
    quantizers = dict(iter_quantizers(model))
    for name, (lo, hi) in searched.items():
        s, z = float(quantizers[name].scale), float(quantizers[name].zero_point)
        expected = compute_qparams(torch.tensor(lo), torch.tensor(hi), 4, False)
        assert s == pytest.approx(float(expected.scale)) and z == float(expected.zero_point), name
    assert all(q.is_calibrated and q.mode is QuantMode.QUANTIZE for _, q in quantizers.items())


def test_candidate_maps_equal_the_full_forward_for_every_point(items):
    """The search recomputes one side of q k^T per candidate; its maps must be those of the module's
    own forward with the same ranges, for every point and attention (clipped to a non-trivial range)."""
    from saq.ptq.pcc import _call_inputs, _PointMaps, _decode_all, _first_inputs
    from saq.ptq.capture import encode_items

    model = build_tiny_sam(seed=2).eval()
    quantize_(model, RULES)
    calibrate_(model, items, show_progress=False)
    with torch.no_grad():
        encoded = encode_items(model, items)
        for name in DECODER_ATTENTIONS(model):
            attention = model.get_submodule(name)
            with _call_inputs(attention) as calls:
                _decode_all(model, encoded, items)
            for point in PCC_POINTS:
                q = attention.get_submodule(point)
                lo, hi = float(q.scale) * (q.qmin - float(q.zero_point)), float(q.scale) * (q.qmax - float(q.zero_point))
                q.set_range(torch.tensor(lo * 0.5), torch.tensor(hi * 0.5))  # a candidate that clips
                with _first_inputs(attention.softmax_quantizer) as full:
                    for args, kwargs in calls:
                        attention(*args, **kwargs)
                partial = list(_PointMaps(attention, point, calls))
                assert len(partial) == len(full) == len(calls)
                for a, b in zip(full, partial):
                    assert torch.equal(a, b), (name, point)
