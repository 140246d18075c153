"""The honesty gate refuses every way a model can only pretend to be quantized."""

import pytest
import torch

from saq.models import build_tiny_sam
from saq.nn import NotDeployableError, QuantRule, assert_deployable, harden_weights_, quantize_
from saq.ptq.calibrate import calibrate_weights_
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


def test_deployable_after_harden():
    model = _calibrated_model()
    harden_weights_(model)
    assert assert_deployable(model) > 0


def test_soft_weights_refused():
    model = _calibrated_model()
    with pytest.raises(NotDeployableError, match="off its integer grid"):
        assert_deployable(model)


def test_quantizer_off_refused():
    model = _calibrated_model()
    harden_weights_(model)
    model.mask_decoder.transformer.layers[0].self_attn.q_quantizer.set_mode(QuantMode.OFF)
    with pytest.raises(NotDeployableError, match="self_attn.q_quantizer: mode is off"):
        assert_deployable(model)


def test_qdrop_left_on_refused():
    model = _calibrated_model()
    harden_weights_(model)
    model.mask_decoder.transformer.layers[1].mlp.lin1.input_quantizer.drop_prob = 0.5
    with pytest.raises(NotDeployableError, match="QDrop probability 0.5"):
        assert_deployable(model)


def test_training_mode_refused():
    model = _calibrated_model()
    harden_weights_(model)
    model.train()
    with pytest.raises(NotDeployableError, match="training mode"):
        assert_deployable(model)


def test_unquantized_model_refused():
    with pytest.raises(NotDeployableError, match="no quantizers"):
        assert_deployable(build_tiny_sam().eval())
