import pytest
import torch

from saq.quant import FakeQuantizer, PerChannel, QuantMode, QuantSpec, compute_qparams, fake_quantize
from saq.quant.functional import int_range
from saq.quant.quantizer import Role, quant_mode, set_quant_mode


def test_asymmetric_qparams_by_hand():
    # range [-1, 3] at 2 bits: 4 levels, step 4/3, zero point round(1 / (4/3)) = 1
    qp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), bits=2, symmetric=False)
    assert qp.scale.item() == pytest.approx(4 / 3)
    assert qp.zero_point.item() == 1
    x = torch.tensor([-1.0, 0.0, 0.6, 0.7, 3.0, 10.0])
    out = fake_quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)
    step = 4 / 3
    assert out.tolist() == pytest.approx([-step, 0.0, 0.0, step, 2 * step, 2 * step])


def test_symmetric_qparams_by_hand():
    qp = compute_qparams(torch.tensor(-2.0), torch.tensor(1.0), bits=4, symmetric=True)
    assert (qp.qmin, qp.qmax) == (-8, 7)
    assert qp.scale.item() == pytest.approx(2.0 / 7.5)
    assert qp.zero_point.item() == 0


def test_range_always_contains_zero():
    qp = compute_qparams(torch.tensor(2.0), torch.tensor(5.0), bits=8, symmetric=False)
    zero = fake_quantize(torch.tensor(0.0), qp.scale, qp.zero_point, qp.qmin, qp.qmax)
    assert zero.item() == 0.0


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
def test_bit_width_bounds_distinct_values_per_tensor(bits):
    x = torch.randn(20000) * 3
    qp = compute_qparams(x.min(), x.max(), bits, symmetric=False)
    assert fake_quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax).unique().numel() <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_per_channel_at_most_2b_values_per_channel(bits):
    w = torch.randn(16, 300) * torch.linspace(0.1, 10, 16)[:, None]
    q = FakeQuantizer(QuantSpec(bits, granularity="channel"), Role.WEIGHT)
    q.set_mode(QuantMode.OBSERVE)
    q(w)
    q.finalize_observer()
    q.set_mode(QuantMode.QUANTIZE)
    out = q(w)
    assert q.scale.shape == (16, 1)
    for row in out:
        assert row.unique().numel() <= 2**bits


def test_bit_width_validated():
    with pytest.raises(ValueError, match="bit width"):
        int_range(1, False)
    with pytest.raises(ValueError, match="bit width"):
        QuantSpec(bits=17)


def test_straight_through_gradient():
    x = torch.tensor([0.1, 0.4, 2.5], requires_grad=True)
    qp = compute_qparams(torch.tensor(0.0), torch.tensor(1.0), 4, False)
    fake_quantize(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax).sum().backward()
    # identity gradient inside the range; outside it the clamp blocks the gradient
    assert x.grad.tolist() == [1.0, 1.0, 0.0]


def test_modes_and_context_manager():
    model = torch.nn.Sequential(FakeQuantizer(QuantSpec(4), Role.ACTIVATION))
    x = torch.randn(100)
    assert model(x) is x  # OFF is the identity
    with quant_mode(model, QuantMode.OBSERVE):
        assert model(x) is x
        assert model[0].mode is QuantMode.OBSERVE
    assert model[0].mode is QuantMode.OFF  # restored
    model[0].set_mode(QuantMode.OBSERVE)
    model(x)
    model[0].finalize_observer()
    assert set_quant_mode(model, QuantMode.QUANTIZE) == 1
    assert model(x).unique().numel() <= 16


def test_uncalibrated_quantize_raises():
    q = FakeQuantizer(QuantSpec(8), Role.ACTIVATION)
    q.set_mode(QuantMode.QUANTIZE)
    with pytest.raises(RuntimeError, match="never calibrated"):
        q(torch.ones(3))


def test_qparams_load_into_empty_quantizer():
    q = FakeQuantizer(QuantSpec(4, granularity="channel"), Role.WEIGHT)
    q.set_range(torch.full((5, 1), -1.0), torch.full((5, 1), 2.0))
    fresh = FakeQuantizer(QuantSpec(4, granularity="channel"), Role.WEIGHT)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.scale, q.scale) and fresh.scale.shape == (5, 1)
    assert PerChannel(0).param_shape((5, 7)) == (5, 1)
