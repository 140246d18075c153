import pytest
import torch

from saq.quant import PerChannel, PerTensor, build_observer
from saq.quant.observers import CalibrationDataError, MinMaxObserver
from saq.quant.stats import histogram, quantile


def test_minmax_over_batches():
    obs = MinMaxObserver(8, False, PerTensor())
    obs.update(torch.tensor([0.5, 2.0]))
    obs.update(torch.tensor([-1.0, 1.0]))
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (-1.0, 2.0)


def test_minmax_per_channel():
    obs = MinMaxObserver(8, False, PerChannel(0))
    obs.update(torch.tensor([[1.0, -3.0], [0.5, 4.0]]))
    lo, hi = obs.compute_range()
    assert lo.flatten().tolist() == [-3.0, 0.5] and hi.flatten().tolist() == [1.0, 4.0]


def test_ema_minmax_by_hand():
    obs = build_observer("ema_minmax", 8, False, PerTensor(), momentum=0.5)
    obs.update(torch.tensor([0.0, 4.0]))
    obs.update(torch.tensor([0.0, 2.0]))
    assert obs.compute_range()[1].item() == pytest.approx(3.0)


def test_percentile_by_hand():
    x = torch.arange(10001, dtype=torch.float32)  # 0..10000
    obs = build_observer("percentile", 8, False, PerTensor(), percentile=99.0)
    obs.update(x)
    lo, hi = obs.compute_range()
    assert (lo.item(), hi.item()) == (100.0, 9900.0)


@pytest.mark.parametrize("bins", [2048, 1000])
@pytest.mark.parametrize("kind", ["normal", "heavy_tail", "integers", "two_values", "constant", "tiny_range"])
def test_histogram_counts_equal_torch_histc(kind, bins):
    """The observers' histogram bins as torch.histc does, element for element (edges included): the
    MSE search on it must not move when the binning is computed another way."""
    g = torch.Generator().manual_seed(0)
    x = {"normal": lambda: torch.randn(300_001, generator=g),
         "heavy_tail": lambda: torch.randn(300_001, generator=g).exp().mul(7.0),
         "integers": lambda: torch.randint(-50, 51, (300_001,), generator=g).float(),  # values on bin edges
         "two_values": lambda: torch.tensor([-1.0, 3.0] * 1000),
         "constant": lambda: torch.full((1000,), 2.5),
         "tiny_range": lambda: 1000.0 + torch.rand(1000, generator=g) * 1e-4}[kind]()
    lo, hi = torch.aminmax(x)
    counts, centres = histogram(x, bins, lo, hi)
    hi_used = hi if hi > lo else lo + 1e-6
    expected = torch.histc(x, bins=bins, min=lo.item(), max=hi_used.item())
    assert torch.equal(counts, expected)
    assert counts.sum().item() == x.numel() and centres.shape == (bins,)


def test_quantile_beyond_torch_quantile_limit():
    x = torch.zeros(2**24 + 10)
    x[-1] = 5.0
    assert quantile(x, 1.0).item() == 5.0
    assert quantile(x, 0.5).item() == 0.0


def test_quantiles_from_one_sort_equal_quantile_one_by_one():
    from saq.quant.stats import quantiles

    torch.manual_seed(0)
    x = torch.randn(3, 1001).round(decimals=1)  # many ties
    qs = [0.0, 0.0001, 0.15, 0.5, 0.85, 0.99, 0.99999, 1.0]
    assert [v.item() for v in quantiles(x, qs)] == [quantile(x, q).item() for q in qs]
    with pytest.raises(ValueError, match="quantile must be in"):
        quantiles(x, [0.5, 1.5])


@pytest.mark.parametrize("name", ["mse", "mse_pooled", "omse"])
def test_error_search_clips_outliers(name):
    torch.manual_seed(0)
    x = torch.randn(200000)
    x[:3] = torch.tensor([80.0, -60.0, 70.0])  # rare outliers would waste a 4-bit grid
    obs = build_observer(name, 4, False, PerTensor())
    obs.update(x)
    lo, hi = obs.compute_range()
    assert -60 < lo.item() < -1 and 1 < hi.item() < 70


@pytest.mark.parametrize("name", ["minmax", "ema_minmax", "percentile", "mse", "mse_pooled", "omse"])
def test_every_observer_per_channel_shape(name):
    obs = build_observer(name, 4, False, PerChannel(0))
    obs.update(torch.randn(8, 3, 3, 3))
    lo, hi = obs.compute_range()
    assert lo.shape == hi.shape == (8, 1, 1, 1)
    assert (lo <= 0).all() and (hi >= 0).all()


def test_nan_in_calibration_is_named():
    obs = build_observer("minmax", 8, False, PerTensor())
    obs.name = "image_encoder.blocks.0.attn.qkv.input"
    with pytest.raises(CalibrationDataError, match="NaN.*image_encoder.blocks.0"):
        obs.update(torch.tensor([1.0, float("nan")]))


def test_unknown_observer():
    with pytest.raises(ValueError, match="unknown observer"):
        build_observer("nope", 8, False, PerTensor())


def _lp_error(w, lo, hi, bits, p=2.4):
    from saq.quant.functional import compute_qparams, fake_quantize

    qp = compute_qparams(lo, hi, bits, False)
    return float((fake_quantize(w, qp.scale, qp.zero_point, qp.qmin, qp.qmax) - w).abs().pow(p).sum())


def _brute_force_step_and_zero_point(rows, bits, p=2.4, grid=100):
    """Every (step fraction, zero point) pair per channel, lowest Lp error first found: the definition
    the bisection over zero points must reproduce."""
    qmin, qmax = 0, 2**bits - 1
    span = (rows.amax(dim=1).clamp(min=0.0) - rows.amin(dim=1).clamp(max=0.0)).clamp_min(1e-8)
    best = [(float("inf"), None, None)] * rows.shape[0]
    for fraction in torch.linspace(1.0 / grid, 1.0, grid):
        scale = (span * fraction / (qmax - qmin)).clamp_min(1e-8)[:, None]
        codes = torch.round(rows / scale)
        for z in range(qmin, qmax + 1):
            err = ((torch.clamp(codes, qmin - z, qmax - z) * scale - rows).abs().pow(p)).sum(dim=1)
            best = [b if e >= b[0] else (float(e), float(scale[c]), z) for c, (e, b) in enumerate(zip(err, best))]
    return torch.tensor([b[1] for b in best]), torch.tensor([float(b[2]) for b in best])


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_zero_point_bisection_finds_the_brute_force_optimum(bits):
    """The error is convex in the integer zero point for a fixed step, so bisecting it finds the same
    (step, zero point) as trying every zero point."""
    from saq.quant.functional import compute_qparams

    torch.manual_seed(bits)
    w = torch.randn(12, 96) * torch.rand(12, 1) + 0.5 * torch.randn(12, 1)
    w[:4, 0] += 4.0  # outliers on some channels
    obs = build_observer("mse", bits, False, PerChannel(0), grid=20)
    obs.update(w)
    qp = compute_qparams(*obs.compute_range(), bits, False)
    scale, zero_point = _brute_force_step_and_zero_point(w, bits, grid=20)
    torch.testing.assert_close(qp.scale.reshape(-1), scale, rtol=1e-5, atol=0)
    assert torch.equal(qp.zero_point.reshape(-1), zero_point)


def test_weight_mse_searches_every_zero_point_per_range():
    """docs/method.md section 2: weights search ranges x zero points per channel. The 2-D grid contains the
    1-D shrink's candidates, so it is never worse; on skewed channels it is strictly better; and the
    returned range maps back to an on-grid (step, integer zero point) pair."""
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.rand(8, 1) + 0.4 * torch.rand(8, 1)  # channels off centre
    w[:, 0] += 3.0  # one large positive outlier per channel: a shifted zero point pays off
    ranges = {}
    for zps in (False, True):
        obs = build_observer("mse", 3, False, PerChannel(0), zero_point_search=zps)
        obs.update(w)
        ranges[zps] = obs.compute_range()
    err_1d, err_2d = _lp_error(w, *ranges[False], 3), _lp_error(w, *ranges[True], 3)
    assert err_2d < err_1d
    per_row = [(_lp_error(w[i:i + 1], ranges[True][0][i:i + 1], ranges[True][1][i:i + 1], 3),
                _lp_error(w[i:i + 1], ranges[False][0][i:i + 1], ranges[False][1][i:i + 1], 3)) for i in range(8)]
    assert all(a <= b * (1 + 1e-5) for a, b in per_row)
    from saq.quant.functional import compute_qparams

    qp = compute_qparams(*ranges[True], 3, False)
    lo, hi = ranges[True]
    torch.testing.assert_close((hi - lo) / qp.scale, torch.full_like(qp.scale, 7.0))
    torch.testing.assert_close(qp.zero_point, (-lo / qp.scale).round(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("where", [0, 4095, 70001, -1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_non_finite_value_is_caught_wherever_it_is(where, bad):
    """The finiteness check reads one min/max pass: a NaN or inf at the first, a vector-boundary, a middle
    or the last position, in a non-contiguous view, must still stop calibration."""
    x = torch.randn(300, 400)
    x.view(-1)[where] = bad
    for view in (x, x.t()):
        with pytest.raises(CalibrationDataError, match="non-finite"):
            MinMaxObserver(8, False, PerTensor()).update(view)


@pytest.mark.parametrize("name", ["mse", "omse"])
def test_a_tensor_repeating_one_slice_gets_the_range_of_its_full_histogram(name, monkeypatch):
    """The decoder's per-prompt copies of the image keys are histogrammed once and counted n times: the
    same range as the histogram of every copy."""
    import saq.quant.observers as observers

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(1, 300, 16, generator=g).exp()
    repeated = rows.expand(12, 300, 16).contiguous()
    assert observers.repeated_slice(repeated)[1] == 12
    assert observers.repeated_slice(torch.randn(12, 300, 16, generator=g))[1] == 1
    fast = build_observer(name, 4, False, PerTensor())
    fast.update(repeated)
    monkeypatch.setattr(observers, "repeated_slice", lambda x: (x, 1))
    full = build_observer(name, 4, False, PerTensor())
    full.update(repeated)
    assert all(torch.equal(a, b) for a, b in zip(fast.compute_range(), full.compute_range()))


def test_pooled_mse_is_the_least_error_range_over_all_batches():
    """The pooled search's range is the candidate of least total Lp error over the concatenated batches,
    computed directly (up to the histogram's bin width); a batch that repeats one slice counts it once per
    copy; the averaged MSE observer gives a different (per-batch) answer on batches of different spread."""
    from saq.quant.functional import compute_qparams, fake_quantize

    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 500, generator=g) * s for s in (1.0, 1.0, 6.0)]
    pooled = build_observer("mse_pooled", 4, False, PerTensor())
    for b in batches:
        pooled.update(b)
    values = torch.cat([b.reshape(-1) for b in batches])
    lo, hi = values.min(), values.max()
    factors = torch.linspace(0.01, 1.0, 100)

    def error(f):
        qp = compute_qparams(lo * f, hi * f, 4, False)
        return float((fake_quantize(values, qp.scale, qp.zero_point, qp.qmin, qp.qmax) - values).abs().pow(2.4).sum())

    best = min(factors, key=error)
    got = pooled.compute_range()
    assert torch.allclose(torch.stack(got), torch.stack([lo * best, hi * best]), atol=0.02 * float(hi - lo))
    averaged = build_observer("mse", 4, False, PerTensor())
    for b in batches:
        averaged.update(b)
    assert not torch.allclose(torch.stack(averaged.compute_range()), torch.stack(got), rtol=0.05)

    repeated = build_observer("mse_pooled", 4, False, PerTensor())
    for b in batches:
        repeated.update(b[:1].expand(4, -1))
    once = build_observer("mse_pooled", 4, False, PerTensor())
    for b in batches:
        once.update(b[:1])
    assert torch.equal(torch.stack(repeated.compute_range()), torch.stack(once.compute_range()))
