"""Weight-range cache: a second calibration of the same weights and spec reads the ranges an earlier
run searched, bit for bit, and anything that changes the weights or the spec searches again."""

import logging

import torch

from saq.models import build_tiny_sam
from saq.nn import QuantRule, quantize_
from saq.ptq.calibrate import calibrate_weights_
from saq.ptq.weight_ranges import WeightRangeCache
from saq.quant import QuantSpec

MSE_W4 = QuantSpec(4, granularity="channel", observer="mse", observer_kwargs={"grid": 8})


def quantized_tiny(spec: QuantSpec = MSE_W4):
    model = build_tiny_sam(seed=1).eval()
    quantize_(model, [QuantRule("*", spec, None)])
    return model


def weight_qparams(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (m.weight_quantizer.scale.clone(), m.weight_quantizer.zero_point.clone())
            for name, m in model.named_modules() if getattr(m, "weight_quantizer", None) is not None}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def test_cached_ranges_are_the_searched_ones(tmp_path):
    searched = quantized_tiny()
    count = calibrate_weights_(searched)  # no cache

    first, second = WeightRangeCache(tmp_path), WeightRangeCache(tmp_path)
    filled = quantized_tiny()
    assert calibrate_weights_(filled, first) == count and (first.hits, first.misses) == (0, count)
    reused = quantized_tiny()
    calibrate_weights_(reused, second)
    assert (second.hits, second.misses) == (count, 0)
    assert same(weight_qparams(searched), weight_qparams(filled))
    assert same(weight_qparams(searched), weight_qparams(reused))


def test_other_weights_or_spec_search_again(tmp_path):
    cache = WeightRangeCache(tmp_path)
    count = calibrate_weights_(quantized_tiny(), cache)
    other_bits = WeightRangeCache(tmp_path)
    calibrate_weights_(quantized_tiny(QuantSpec(6, granularity="channel", observer="mse",
                                                observer_kwargs={"grid": 8})), other_bits)
    assert other_bits.hits == 0
    flipped = quantized_tiny()  # what a bimodal fold does to q/k: rows change sign
    attention = flipped.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    with torch.no_grad():
        attention.k_proj.weight.neg_()
    after_fold = WeightRangeCache(tmp_path)
    calibrate_weights_(flipped, after_fold)
    assert (after_fold.hits, after_fold.misses) == (count - 1, 1)


def test_an_unreadable_entry_is_reported_and_searched_again(tmp_path, caplog):
    count = calibrate_weights_(quantized_tiny(), WeightRangeCache(tmp_path))
    victim = sorted(tmp_path.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:20])  # truncated
    cache = WeightRangeCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = quantized_tiny()
        calibrate_weights_(model, cache)
    assert (cache.hits, cache.misses) == (count - 1, 1)
    assert victim.name in caplog.text and "recomputing" in caplog.text
    reference = quantized_tiny()
    calibrate_weights_(reference)
    assert same(weight_qparams(model), weight_qparams(reference))


def test_an_unwritable_cache_warns_once_per_run(tmp_path, caplog, monkeypatch):
    import errno

    from saq.ptq import weight_ranges

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weight_ranges, "atomic_file", no_space)
    cache = WeightRangeCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        model = quantized_tiny()
        count = calibrate_weights_(model, cache)
    assert count > 1 and caplog.text.count("is not writable") == 1
    reference = quantized_tiny()
    calibrate_weights_(reference)
    assert same(weight_qparams(model), weight_qparams(reference))  # calibration itself unchanged
