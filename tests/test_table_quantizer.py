"""The level-table quantizer for post-GELU inputs, against direct computations."""

import pytest
import torch

from saq.export.qdq import qdq_expressible
from saq.models.build import build_architecture
from saq.nn import quantize_
from saq.nn.deploy import deployment_problems
from saq.ptq.post_gelu import NoPostGeluInputsError, post_gelu_inputs, with_post_gelu_rules
from saq.ptq.recipe import rules_from_config
from saq.quant.quantizer import QuantMode, QuantSpec, Role, iter_quantizers, set_quant_mode
from saq.quant.table_quantizer import (HybridTableObserver, LevelTableQuantizer, hybrid_table, nearest_levels,
                                      rounded_to_table, table_mse, uniform_table)

SPEC = QuantSpec(bits=4, observer="hybrid_log_uniform", quantizer="table")


def calibrated(table: torch.Tensor, scale: float) -> LevelTableQuantizer:
    q = LevelTableQuantizer(SPEC, Role.ACTIVATION)
    q.set_table(scale, table)
    q.set_mode(QuantMode.QUANTIZE)
    return q


def test_hybrid_table_holds_the_levels_it_names():
    table = hybrid_table(16, negative=-0.1, n_neg=2, n_log=3, split=0.2)
    expected = [-0.1, -0.05, 0.0, 0.025, 0.05, 0.1] + [0.2 + 0.8 * j / 9 for j in range(10)]
    assert torch.allclose(table, torch.tensor(expected), atol=1e-7)
    with pytest.raises(ValueError, match="no hybrid table"):
        hybrid_table(16, negative=-0.1, n_neg=3, n_log=11, split=0.2)  # leaves one uniform level


def test_forward_is_the_nearest_level_and_the_gradient_is_straight_through():
    table = hybrid_table(16, negative=-0.2, n_neg=2, n_log=4, split=0.3)
    q = calibrated(table, scale=2.0)
    x = torch.linspace(-1.0, 3.0, 997, dtype=torch.float32)
    levels = 2.0 * table
    direct = levels[(x[:, None] - levels[None, :]).abs().argmin(dim=1)]
    assert torch.equal(q(x), direct)
    assert torch.equal(q.int_codes(x).long(), (x[:, None] - levels[None, :]).abs().argmin(dim=1))

    q.make_scale_learnable()
    xg = x.clone().requires_grad_(True)
    out = q(xg)
    assert torch.allclose(out, direct)  # the training path gives the same values
    out.sum().backward()
    inside = (x >= levels[0]) & (x <= levels[-1])
    assert torch.equal(xg.grad, inside.float())
    g = 1.0 / (x.numel() * 15) ** 0.5  # LSQ's gradient scale
    expected_ds = torch.where(inside, direct / 2.0 - x / 2.0, direct / 2.0).sum() * g
    assert torch.allclose(q.scale.grad, expected_ds, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("table", [
    hybrid_table(16, negative=-0.2, n_neg=2, n_log=4, split=0.3),
    hybrid_table(16, negative=-0.17, n_neg=1, n_log=6, split=0.05),
    uniform_table(16, -0.1),
    # a table whose running sum of steps misses a level by an ulp in float32: the index path
    torch.tensor([-0.9187023639678955, 4.2310919761657715, 4.423362731933594, 6.297989845275879]),
])
def test_rounding_by_steps_gives_exactly_the_nearest_level(table):
    midpoints = (table[1:] + table[:-1]) / 2  # ties: the upper level, as nearest_levels
    u = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 3, midpoints,
                   torch.tensor([-1e9, 1e9, 0.0])])
    expected = table[nearest_levels(u, table)]
    assert torch.equal(rounded_to_table(u, table), expected)
    assert torch.equal(rounded_to_table(u.reshape(2, -1).t(), table), expected.reshape(2, -1).t())  # not contiguous


def test_the_search_beats_a_uniform_grid_on_post_gelu_values():
    x = torch.nn.functional.gelu(torch.randn(16, 4096, generator=torch.Generator().manual_seed(0)) * 1.5)
    obs = HybridTableObserver(4, samples=16384)  # a smaller sample than calibration's: the same search, faster
    obs.name = "test"
    for chunk in x.split(4):
        obs.update(chunk)
    scale, table, err = obs.best()
    assert table.numel() == 16 and bool((table.diff() > 0).all()) and 0.0 in table.tolist()
    sample = obs.sample().double()
    # the reported error is the direct one, and it is below the best uniform grid's over the same clipping
    assert err == pytest.approx(table_mse(sample / scale, table.double()) * scale**2, rel=1e-9)
    best_uniform = min(table_mse(sample / (c * x.max()), uniform_table(16, float(x.min() / (c * x.max()))).double())
                       * float(c * x.max()) ** 2 for c in obs.clips)
    assert err < 0.8 * best_uniform


def test_post_gelu_layers_are_found_by_data_flow_and_get_the_table():
    model = build_architecture("tiny", seed=0).eval()
    assert post_gelu_inputs(model) == ["image_encoder.blocks.0.mlp.lin2", "image_encoder.blocks.1.mlp.lin2"]
    quant = {"weight": {"granularity": "channel"}, "act": {},
             "rules": [{"pattern": "image_encoder*", "w_bits": 4, "a_bits": 4}]}
    ptq = {"weight_observer": {"name": "mse"}, "act_observer": {"name": "mse"}}
    rules = with_post_gelu_rules(model, rules_from_config(quant, ptq), {"kwargs": {"max_log": 3}})
    quantize_(model, rules)
    tables = {n for n, q in iter_quantizers(model) if isinstance(q, LevelTableQuantizer)}
    assert tables == {"image_encoder.blocks.0.mlp.lin2.input_quantizer", "image_encoder.blocks.1.mlp.lin2.input_quantizer"}
    q = model.get_submodule("image_encoder.blocks.0.mlp.lin2.input_quantizer")
    assert q.spec.observer_kwargs == {"max_log": 3} and not qdq_expressible(q)[0]
    set_quant_mode(model, QuantMode.QUANTIZE)
    assert any("never calibrated" in p for p in deployment_problems(model))

    fp_rules = rules_from_config({**quant, "rules": [{"pattern": "image_encoder*", "w_bits": 4}]}, ptq)
    with pytest.raises(NoPostGeluInputsError, match="post_gelu_quantizer=null"):
        with_post_gelu_rules(build_architecture("tiny", seed=0), fp_rules, {})


def test_a_table_survives_the_state_dict():
    table = hybrid_table(16, negative=-0.15, n_neg=1, n_log=5, split=0.1)
    q = calibrated(table, scale=3.0)
    fresh = LevelTableQuantizer(SPEC, Role.ACTIVATION)
    fresh.load_state_dict(q.state_dict())
    fresh.set_mode(QuantMode.QUANTIZE)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(ValueError, match="ascending"):
        fresh.set_table(1.0, table.flip(0))


def test_tinyvit_post_gelu_layers_include_its_convolutions():
    names = post_gelu_inputs(build_architecture("vit_t", seed=0).eval())
    enc = "image_encoder.layers"
    mlps = [n for n in names if n.endswith("mlp.fc2")]
    assert len(mlps) == 10  # every transformer block of stages 1-3 (2 + 6 + 2)
    # inside each MBConv and patch merging: conv -> GELU -> conv -> GELU -> conv
    assert {f"{enc}.0.blocks.{b}.conv{i}.c" for b in (0, 1) for i in (2, 3)} <= set(names)
    assert {f"{enc}.{s}.downsample.conv{i}.c" for s in (0, 1, 2) for i in (2, 3)} <= set(names)
    # an MBConv ends in a GELU: the next block's and the patch merging's first conv read it
    assert {f"{enc}.0.blocks.1.conv1.c", f"{enc}.0.downsample.conv1.c"} <= set(names)
    assert f"{enc}.0.blocks.0.conv1.c" not in names and f"{enc}.1.downsample.conv1.c" not in names
