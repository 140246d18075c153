"""The honesty gate refuses every way a model can only pretend to be quantized.

Each case checks the exact list ``deployment_problems`` returns (one named problem, nothing else),
so a check that reports the wrong module, misses a problem or flags a sound model fails here."""

import json

import pytest
import torch

from saq.eval import EvalResult
from saq.models import build_tiny_sam
from saq.nn import NotDeployableError, QuantRule, assert_deployable, deployment_problems, harden_weights_, quantize_
from saq.nn.deploy import deployment_check
from saq.nn.modules import QuantizedModule
from saq.ptq.calibrate import calibrate_weights_
from saq.ptq.pipeline import METRIC_KEYS, refuse_undeployable
from saq.quant import QuantMode, QuantSpec, iter_quantizers, set_quant_mode


def _calibrated_model():
    model = build_tiny_sam().eval()
    quantize_(model, [QuantRule("prompt_encoder*"), QuantRule("*", QuantSpec(4, granularity="channel"), QuantSpec(8))])
    calibrate_weights_(model)
    for _, q in iter_quantizers(model):
        if not q.is_calibrated:
            q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    set_quant_mode(model, QuantMode.QUANTIZE)
    return model


def _deployable_model():
    model = _calibrated_model()
    harden_weights_(model)
    return model


def _weight_modules(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, QuantizedModule) and getattr(m, "weight_quantizer", None) is not None]


def test_deployable_after_harden():
    model = _deployable_model()
    count = sum(1 for _ in iter_quantizers(model))
    assert count == 152  # every Linear / Conv2d weight and input, attention points, outside the prompt encoder
    assert deployment_check(model) == (count, [])
    assert assert_deployable(model) == count


def test_soft_weights_refused():
    """Calibrated but not hardened: every quantized weight, and only the weights, is named."""
    model = _calibrated_model()
    problems = deployment_problems(model)
    assert [p.split(".weight:")[0] for p in problems] == _weight_modules(model)
    assert all(p.endswith("steps off its integer grid (weights not hardened)") for p in problems)
    with pytest.raises(NotDeployableError, match="off its integer grid"):
        assert_deployable(model)


def _nudge_weight(model, steps: float) -> None:
    """Move one weight of decoder layer 1's lin1 (4-bit per channel) by ``steps`` steps of its channel."""
    linear = model.mask_decoder.transformer.layers[1].mlp.lin1
    with torch.no_grad():
        linear.weight[3, 5] += steps * linear.weight_quantizer.scale[3, 0]


def _refusals():
    """(what breaks a deployable model, the one problem the check must report)."""
    lin1 = "mask_decoder.transformer.layers.1.mlp.lin1"

    def nudged(model):
        _nudge_weight(model, 0.4)

    def past_the_range(model):
        linear = model.mask_decoder.transformer.layers[1].mlp.lin1
        q = linear.weight_quantizer
        with torch.no_grad():  # on the grid, 2 codes above qmax
            linear.weight[0, 0] = (q.qmax + 2 - q.zero_point[0, 0]) * q.scale[0, 0]

    def soft_rounding(model):
        linear = model.mask_decoder.transformer.layers[1].mlp.lin1
        linear.weight_quantizer.enable_soft_rounding(linear.weight)

    def switched_off(model):
        model.mask_decoder.transformer.layers[0].self_attn.q_quantizer.set_mode(QuantMode.OFF)

    def dropping(model):
        model.mask_decoder.transformer.layers[1].mlp.lin1.input_quantizer.drop_prob = 0.5

    def never_calibrated(model):
        q = model.mask_decoder.transformer.layers[0].self_attn.q_quantizer
        q.scale, q.zero_point = torch.empty(0), torch.empty(0)

    def nan_scale(model):
        model.mask_decoder.transformer.layers[0].self_attn.q_quantizer.scale.fill_(float("nan"))

    def nan_weight(model):
        with torch.no_grad():
            model.mask_decoder.transformer.layers[1].mlp.lin1.weight[2, 7] = float("nan")

    def inf_bias(model):
        with torch.no_grad():
            model.image_encoder.neck[0].weight[0, 0, 0, 0] = float("inf")

    q_quantizer = "mask_decoder.transformer.layers.0.self_attn.q_quantizer"
    return {
        "nan weight": (nan_weight, f"{lin1}.weight: 1 NaN or inf values in this parameter"),
        "inf weight": (inf_bias, "image_encoder.neck.0.weight: 1 NaN or inf values in this parameter"),
        "weight off its grid": (nudged, f"{lin1}.weight: 0.4 steps off its integer grid (weights not hardened)"),
        "weight code past qmax": (past_the_range, f"{lin1}.weight: codes outside [0, 15]"),
        "soft rounding": (soft_rounding,
                          f"{lin1}.weight_quantizer: soft (AdaRound) rounding still on: weights were not hardened"),
        "quantizer off": (switched_off, f"{q_quantizer}: mode is off, expected quantize"),
        "qdrop left on": (dropping,
                          f"{lin1}.input_quantizer: QDrop probability 0.5 (evaluation must be deterministic)"),
        "never calibrated": (never_calibrated, f"{q_quantizer}: never calibrated"),
        "nan scale": (nan_scale, f"{q_quantizer}: non-finite or non-positive scale / zero point"),
    }


@pytest.mark.parametrize("case", list(_refusals()))
def test_each_problem_is_named_exactly_once(case):
    breaks, expected = _refusals()[case]
    model = _deployable_model()
    breaks(model)
    assert deployment_problems(model) == [expected]
    with pytest.raises(NotDeployableError, match=r"\(1 problems\)"):
        assert_deployable(model)


def test_a_weight_within_tolerance_of_its_grid_is_deployable():
    model = _deployable_model()
    _nudge_weight(model, 1e-5)  # float noise, far below GRID_TOLERANCE
    assert deployment_problems(model) == []


def test_training_mode_refused():
    model = _deployable_model()
    model.train()
    problems = deployment_problems(model)
    assert problems == [f"{name or 'model'}: in training mode" for name, _ in model.named_modules()]
    model.eval()
    assert deployment_problems(model) == []


def test_unquantized_model_refused():
    model = build_tiny_sam().eval()
    assert deployment_check(model) == (0, ["model has no quantizers (was quantize_ applied?)"])
    assert deployment_check(model, require_quantizers=False) == (0, [])  # an FP run: nothing to refuse
    with pytest.raises(NotDeployableError, match="no quantizers"):
        assert_deployable(model)


@pytest.mark.parametrize("case", ["quantizer off", "qdrop left on", "soft rounding", "weight off its grid"])
def test_run_records_the_refusal_not_a_flag(case, tmp_path):
    """metrics.json of a refused model holds the check's own problems, deployable false and no
    quantized numbers, and the run stops."""
    breaks, _ = _refusals()[case]
    model = _deployable_model()
    breaks(model)
    config = {"ptq": {"name": "qdrop"}, "quant": {"name": "w4a8"}, "model": {"name": "tiny"}}
    fp = EvalResult([], {k: 0.5 for k in METRIC_KEYS})
    with pytest.raises(NotDeployableError):
        refuse_undeployable(model, tmp_path, config, fp)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["deployable"] is False and metrics["quantized"] == {}
    assert metrics["deployment_problems"] == deployment_problems(model) and len(metrics["deployment_problems"]) == 1
    assert metrics["fp"]["mask_AP"] == 0.5


def test_run_with_a_deployable_model_writes_nothing(tmp_path):
    config = {"ptq": {"name": "qdrop"}, "quant": {"name": "w4a8"}, "model": {"name": "tiny"}}
    refuse_undeployable(_deployable_model(), tmp_path, config, EvalResult([], {k: 0.5 for k in METRIC_KEYS}))
    assert not (tmp_path / "metrics.json").exists()
