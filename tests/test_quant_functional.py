import pytest
import torch

from saq.quant import FakeQuantizer, PerChannel, QuantMode, QuantSpec, compute_qparams, fake_quantize
from saq.quant.functional import int_range
from saq.quant.qdrop import keep_fp_mask
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


def _observed(x: torch.Tensor, spec: QuantSpec, role: Role = Role.WEIGHT) -> tuple[FakeQuantizer, torch.Tensor]:
    """A quantizer calibrated (min-max) on x, and x fake-quantized by it."""
    q = FakeQuantizer(spec, role)
    q.set_mode(QuantMode.OBSERVE)
    q(x)
    q.finalize_observer()
    q.set_mode(QuantMode.QUANTIZE)
    return q, q(x)


def _codes(out: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """The integer code q of every output value, assuming out = (q - z) * s (checked by the caller)."""
    return out.double() / torch.as_tensor(scale, dtype=torch.float64) + torch.as_tensor(zero_point, dtype=torch.float64)


def test_per_tensor_values_by_hand():
    # 3 bits, range [-1, 2.5]: s = 3.5 / 7 = 0.5, z = round(1 / 0.5) = 2; no value sits on a rounding tie
    q, out = _observed(torch.tensor([-1.0, -0.3, 0.4, 2.5, 1.1]), QuantSpec(3), Role.ACTIVATION)
    assert q.scale.item() == 0.5 and q.zero_point.item() == 2.0
    assert out.tolist() == [-1.0, -0.5, 0.5, 2.5, 1.0]  # codes 0, 1, 3, 7, 4


def test_per_channel_values_by_hand():
    """Each row has its own scale / zero point; all-positive and all-negative rows still contain 0."""
    w = torch.tensor([[-1.0, -0.3, 0.4, 2.5],      # [-1, 2.5]: s = 0.5, z = 2
                      [0.25, 0.85, 1.33, 1.4],     # [0, 1.4]:  s = 0.2, z = 0
                      [-3.5, -2.2, -0.7, -0.1]])   # [-3.5, 0]: s = 0.5, z = 7
    q, out = _observed(w, QuantSpec(3, granularity="channel"))
    assert q.scale.flatten().tolist() == pytest.approx([0.5, 0.2, 0.5], rel=1e-6)
    assert q.zero_point.flatten().tolist() == [2.0, 0.0, 7.0]
    expected = [[-1.0, -0.5, 0.5, 2.5],    # codes 0, 1, 3, 7
                [0.2, 0.8, 1.4, 1.4],      # codes 1, 4, 7, 7 (1.33 / 0.2 = 6.65 rounds up)
                [-3.5, -2.0, -0.5, 0.0]]   # codes 0, 3, 6, 7
    assert torch.allclose(out, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_per_tensor_output_is_exactly_the_hand_computed_grid(bits):
    """Every output is (q - z) * s for an integer q in [0, 2^b - 1], with s and z computed here by hand,
    equal to the hand-quantized input, and a dense input uses every one of the 2^b levels."""
    lo, hi = -1.3, 2.9
    x = torch.linspace(lo, hi, 4001)
    levels = 2**bits - 1
    s = (hi - lo) / levels
    z = round(-lo / s)
    q, out = _observed(x, QuantSpec(bits), Role.ACTIVATION)
    assert q.scale.item() == pytest.approx(s, rel=1e-6) and q.zero_point.item() == z
    codes = _codes(out, s, z)
    assert (codes - codes.round()).abs().max().item() < 1e-4  # on the grid
    assert set(codes.round().long().tolist()) == set(range(levels + 1))  # all 2^b levels, nothing else
    ratio = x.double() / s
    hand = (ratio.round() + z).clamp(0, levels)
    clear = ((ratio - ratio.floor()) - 0.5).abs() > 1e-4  # away from rounding ties (float32 vs float64)
    assert clear.float().mean() > 0.99
    assert torch.equal(codes.round()[clear], hand[clear])


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_per_channel_output_is_exactly_each_channels_grid(bits):
    """Per output channel: s_c = range_c / (2^b - 1) and z_c by hand, every value on that channel's
    grid (not a neighbour's), and each row's min and max on codes 0 and 2^b - 1."""
    w = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 16)[:, None]
    levels = 2**bits - 1
    lo = w.double().amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = w.double().amax(dim=1, keepdim=True).clamp(min=0.0)
    s = (hi - lo) / levels
    z = (-lo / s).round()
    q, out = _observed(w, QuantSpec(bits, granularity="channel"))
    assert q.scale.shape == (16, 1)
    assert torch.allclose(q.scale.double(), s, rtol=1e-6, atol=0) and torch.equal(q.zero_point.double(), z)
    codes = _codes(out, s, z)
    assert (codes - codes.round()).abs().max().item() < 1e-4
    assert codes.round().min().item() >= 0 and codes.round().max().item() <= levels
    rows = torch.arange(16)
    assert codes.round()[rows, w.argmin(dim=1)].tolist() == [0.0] * 16
    assert codes.round()[rows, w.argmax(dim=1)].tolist() == [float(levels)] * 16


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


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantize_gradients_are_lsq(per_channel):
    """The custom backward gives LSQ's gradients (clipping decided on v = x/s + z before rounding), the
    same as autograd of the written-out ops wherever the code is not on a clamp bound, and the forward
    is the same values bit for bit."""
    from saq.quant.functional import round_ste

    torch.manual_seed(0)
    x = (torch.randn(6, 40) * 3).requires_grad_()
    shape = (6, 1) if per_channel else ()
    scale = (torch.rand(shape) * 0.3 + 0.05).requires_grad_()
    zero_point = torch.randint(0, 16, shape).float()
    grad_out = torch.randn(6, 40)

    out = fake_quantize(x, scale, zero_point, 0, 15)
    out.backward(grad_out)
    got_x, got_s = x.grad.clone(), scale.grad.clone()
    with torch.no_grad():
        v = x / scale + zero_point
        inside = (v >= 0) & (v <= 15)
        lsq_local = torch.where(inside, torch.round(x / scale) - x / scale, torch.round(v).clamp(0, 15) - zero_point)
        lsq_s = (grad_out * lsq_local).sum(dim=1, keepdim=True).reshape(shape) if per_channel \
            else (grad_out * lsq_local).sum()
    assert (~inside).any() and inside.any()
    assert torch.equal(got_x, grad_out * inside)
    torch.testing.assert_close(got_s, lsq_s)

    x.grad, scale.grad = None, None
    ref = (torch.clamp(round_ste(x / scale) + zero_point, 0, 15) - zero_point) * scale
    ref.backward(grad_out)
    assert torch.equal(out.detach(), ref.detach())
    off_bound = (torch.round(v) > 0) & (torch.round(v) < 15)
    torch.testing.assert_close(got_x[off_bound], x.grad[off_bound])


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdrop_inside_the_straight_through_node_equals_where_over_it(per_channel):
    """QDrop in one autograd node gives the values and gradients (x and step) of the composition it
    replaces, torch.where(keep, x, fake_quantize(x)), exactly; and a quantizer draws its mask with
    keep_fp_mask (``uniform``: the stream of runs made before ``bits``, one rand_like per call)."""
    torch.manual_seed(0)
    shape = (6, 1) if per_channel else ()
    x = (torch.randn(6, 40) * 3).requires_grad_()
    scale = (torch.rand(shape) * 0.3 + 0.05).requires_grad_()
    zero_point = torch.randint(0, 16, shape).float()
    keep = torch.rand(6, 40) < 0.5
    grad_out = torch.randn(6, 40)

    fused = fake_quantize(x, scale, zero_point, 0, 15, keep_fp=keep)
    fused.backward(grad_out)
    got = fused.detach().clone(), x.grad.clone(), scale.grad.clone()
    x.grad, scale.grad = None, None
    composed = torch.where(keep, x, fake_quantize(x, scale, zero_point, 0, 15))
    composed.backward(grad_out)
    assert keep.any() and (~keep).any()
    assert torch.equal(got[0], composed.detach())
    assert torch.equal(got[1], x.grad)
    assert torch.equal(got[2], scale.grad)
    with torch.no_grad():  # the inference path too
        assert torch.equal(fake_quantize(x, scale, zero_point, 0, 15, keep_fp=keep), composed)

    q = FakeQuantizer(QuantSpec(bits=4), Role.ACTIVATION)
    q.set_range(torch.tensor(-2.0), torch.tensor(2.0))
    q.set_mode(QuantMode.QUANTIZE)
    q.drop_prob = 0.5
    q.train()
    for draws in ("bits", "uniform"):
        q.drop_draws = draws
        torch.manual_seed(1)
        y = q(x.detach())
        torch.manual_seed(1)
        mask = keep_fp_mask(x, 0.5, draws)
        assert torch.equal(y, torch.where(mask, x.detach(), fake_quantize(x.detach(), q.scale, q.zero_point, 0, 15)))
    torch.manual_seed(1)
    uniform = keep_fp_mask(x, 0.5, "uniform")
    torch.manual_seed(1)
    assert torch.equal(uniform, torch.rand_like(x) < 0.5)


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


def _counting(kernel):
    """kernel, and a list that grows by one at each call (to assert the compiled path ran)."""
    calls = []

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    return counted, calls


def test_fused_kernel_equals_the_eager_arithmetic_bit_for_bit():
    """runtime.compile: the compiled fake quantization gives the eager values exactly, per tensor and per
    channel, on codes at both clamps and on exact ties (half to even); the gradients do not change."""
    from saq.quant.functional import fused_fake_quantize

    fused, calls = _counting(fused_fake_quantize())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=g) * 4
    x[0, 0, :4] = torch.tensor([0.25, 0.75, -0.25, 100.0])  # ties at scale 0.5 and a clamped value
    for scale, zero in ((torch.tensor(0.5), torch.tensor(7.0)),
                        (torch.rand(3, 1, 1, generator=g) + 0.05,
                         torch.randint(0, 15, (3, 1, 1), generator=g).float())):
        eager = fake_quantize(x, scale, zero, 0, 15)
        before = len(calls)
        assert torch.equal(fake_quantize(x, scale, zero, 0, 15, fused), eager)
        keep = torch.rand(x.shape, generator=g) < 0.5  # QDrop's select in the same kernel
        assert torch.equal(fake_quantize(x, scale, zero, 0, 15, fused, keep), torch.where(keep, x, eager))
        assert len(calls) == before + 2  # both went through the kernel, not the eager fallback
        xs = x.clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        fake_quantize(xs, s, zero, 0, 15, fused).pow(2).sum().backward()
        xe = x.clone().requires_grad_(True)
        se = scale.clone().requires_grad_(True)
        fake_quantize(xe, se, zero, 0, 15).pow(2).sum().backward()
        assert torch.equal(xs.grad, xe.grad) and torch.equal(s.grad, se.grad)


def test_compiled_fake_quantization_output_can_be_modified_in_place():
    """The compiled kernel's result is reshaped to x's layout; what the straight-through node returns is
    still a tensor of its own, so an in-place op after it (a residual add_) keeps the node's gradients."""
    from saq.quant.functional import fused_fake_quantize

    fused = fused_fake_quantize()
    grads = []
    for kernel in (fused, None):
        x = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        s = torch.tensor(0.1, requires_grad=True)
        y = fake_quantize(x, s, torch.tensor(7.0), 0, 15, kernel)
        y.mul_(2)
        y.sum().backward()
        grads.append((x.grad, s.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _permuted(t):
    """t's values laid out as SAM's image tokens are: a transposed view of a contiguous tensor."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("with_drop", [False, True])
def test_compiled_backward_gives_the_eager_gradients(with_drop):
    """runtime.compile in reconstruction: the compiled backward of the straight-through node gives the
    eager gradients of x and of the step exactly, per tensor and per channel, with and without QDrop's
    mask, on permuted inputs too (through the flat view of their storage, or contiguous copies where only
    x is permuted); a strided input, or a gradient laid out unlike both, runs eagerly."""
    from saq.quant.functional import fused_ste_backward

    kernel, calls = _counting(fused_ste_backward())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, 24, generator=g) * 4
    grad_out = torch.randn(6, 40, 24, generator=g)
    keep = torch.rand(6, 40, 24, generator=g) < 0.5 if with_drop else None

    def grads(x_full, grad_full, keep_in, backward, scale, zero, every=1):
        """Gradients of x_full[..., ::every] (a leaf laid out as x_full) and of the step."""
        leaf = x_full.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        xs, s = leaf[..., ::every], scale.clone().requires_grad_(True)
        fake_quantize(xs, s, zero, 0, 15, keep_fp=keep_in, fused_backward=backward).backward(
            grad_full[..., ::every])
        return leaf.grad[..., ::every], s.grad

    def assert_same(x_in, grad_in, keep_in, scale, zero, kernel_runs, every=1):
        before = len(calls)
        (gx, gs), (ex, es) = (grads(x_in, grad_in, keep_in, b, scale, zero, every) for b in (kernel, None))
        assert len(calls) == before + kernel_runs
        assert torch.equal(gx, ex) and (ex == 0).any() and torch.equal(gs, es)

    per_tensor = (torch.tensor(0.5), torch.tensor(7.0))
    per_channel = (torch.rand(6, 1, 1, generator=g) + 0.05, torch.randint(0, 15, (6, 1, 1), generator=g).float())
    for scale, zero in (per_tensor, per_channel):
        assert_same(x, grad_out, keep, scale, zero, kernel_runs=1)
    keep_p = _permuted(keep) if with_drop else None
    # x, gradient and mask permuted alike (SAM's image tokens): the kernel on the flat view of the storage
    assert_same(_permuted(x), _permuted(grad_out), keep_p, *per_tensor, kernel_runs=1)
    # only x (and the mask) permuted, the gradient contiguous: the kernel on contiguous copies
    assert_same(_permuted(x), grad_out, keep_p, *per_tensor, kernel_runs=1)
    # a gradient laid out unlike x and not contiguous, or a strided x (every other element): eager
    assert_same(x, _permuted(grad_out), keep, *per_tensor, kernel_runs=0)
    assert_same(x, grad_out, keep[..., ::2] if with_drop else None, *per_tensor, kernel_runs=0, every=2)


def test_a_non_finite_gradient_at_an_element_kept_fp_leaves_the_step_gradient_finite():
    """QDrop: an element kept FP does not depend on the step, so an inf or NaN arriving at it reaches x
    and never the step's gradient, eagerly or compiled."""
    from saq.quant.functional import fused_ste_backward

    x = torch.linspace(-3, 3, 64).reshape(4, 16)
    keep = torch.zeros(4, 16, dtype=torch.bool)
    keep[0, :3] = True
    grad_out = torch.ones(4, 16)
    grad_out[0, 0], grad_out[0, 1] = float("nan"), float("inf")
    for backward in (None, fused_ste_backward()):
        xs, s = x.clone().requires_grad_(True), torch.tensor(0.4, requires_grad=True)
        fake_quantize(xs, s, torch.tensor(7.0), 0, 15, keep_fp=keep, fused_backward=backward).backward(grad_out)
        assert torch.isfinite(s.grad) and xs.grad[0, 0].isnan() and xs.grad[0, 1].isinf()


def test_a_kernel_that_fails_to_compile_runs_eagerly_with_one_warning(caplog):
    """runtime.compile on a machine where inductor cannot compile (no C++ compiler): same values, eager."""
    from saq.quant.fused import EagerFallback
    from saq.quant.functional import _fake_quantize_values

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("InductorError: no working C++ compiler found")

    kernel = EagerFallback(broken, _fake_quantize_values, "the uniform fake quantizer")
    x, s, z = torch.randn(4, 8), torch.tensor(0.1), torch.tensor(3.0)
    with caplog.at_level("WARNING"):
        first, second = kernel(x, s, z, 0, 15), kernel(x, s, z, 0, 15)
    assert torch.equal(first, fake_quantize(x, s, z, 0, 15)) and torch.equal(second, first)
    assert len(calls) == 1 and sum("running it eagerly" in r.message for r in caplog.records) == 1


def test_views_of_many_layouts_share_one_compiled_kernel():
    """Per-tensor inputs reach the kernel as (1, N) rows of their storage; which view (a permuted token
    map, a channel slice) they came from must not compile the kernel anew each time: dynamo would guard
    on each base's layout and, past its recompile limit, run the arithmetic uncompiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from saq.quant.fused import EagerFallback
    from saq.quant.functional import _fake_quantize_values, fused_fake_quantize

    torch._dynamo.reset()
    kernel = EagerFallback(fused_fake_quantize(), _fake_quantize_values, "test kernel")
    scale, zero = torch.tensor(0.05), torch.tensor(8.0)
    before = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(5, 7, generator=g), torch.randn(3, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g),
             torch.randn(3, 7, 5, generator=g).permute(0, 2, 1), torch.randn(7, 5, 3, generator=g).permute(2, 1, 0),
             torch.randn(2, 7, 5, 3, generator=g).permute(0, 3, 2, 1),
             torch.randn(2, 3, 7, 5, generator=g).transpose(-1, -2),
             torch.randn(4, 6, 9, 2, generator=g).permute(0, 2, 1, 3), torch.randn(6, 4, 2, generator=g).permute(1, 0, 2),
             torch.randn(3, 4, 5, 6, 2, generator=g).permute(0, 4, 1, 3, 2)]  # ten bases of five ranks
    for x in views:
        assert torch.equal(fake_quantize(x, scale, zero, 0, 15, kernel), fake_quantize(x, scale, zero, 0, 15))
    assert counters["stats"]["unique_graphs"] - before <= 2  # was one per base, up to the recompile limit
