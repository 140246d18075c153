"""Quantizers follow the module they wrap: device and dtype of every qparam, without a GPU.

A model on the ``meta`` device or in float64 stands in for a model already moved to a GPU: any
quantizer tensor created with the defaults (CPU, float32) shows up as a mismatch here.
"""

import pytest
import torch

from helpers.rules import protocol_rules
from saq.models import build_tiny_sam
from saq.nn import QuantRule, harden_weights_, quantize_
from saq.ptq.calibrate import calibrate_
from saq.ptq.reconstruct import reconstruct_
from saq.quant import QuantSpec
from saq.quant.quantizer import FakeQuantizer, Role, iter_quantizers
from saq.utils.loggers import RunLogger

LOG_SOFTMAX = QuantSpec(4, observer="agq", quantizer="log", observer_kwargs={"grid": 4})
RULES = protocol_rules(QuantSpec(4, granularity="channel"), QuantSpec(6),
                       QuantRule("*attn*", QuantSpec(4, granularity="channel"), QuantSpec(6), softmax=LOG_SOFTMAX))
RECON = {"iters": 2, "granularity": "block", "parts": ["encoder", "decoder"], "weights": "adaround",
         "activations": "lsq", "w_lr": 1e-2, "a_lr": 1e-3, "qdrop_prob": 0.5, "best_window": 1}


def misplaced(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Every quantizer parameter or buffer not on ``device`` in ``dtype``."""
    bad = []
    for name, q in iter_quantizers(model):
        for key, t in [*q.named_parameters(recurse=False), *q.named_buffers(recurse=False)]:
            if t is not None and (t.device != device or t.dtype != dtype):
                bad.append(f"{name}.{key}: {t.device} {t.dtype}")
    return bad


def float64_tiny() -> torch.nn.Module:
    model = build_tiny_sam(seed=1).double().eval()
    model.prompt_encoder.float()  # segment-anything casts box coordinates to float32 there
    return model


@pytest.fixture(scope="module")
def items(random_calibration_items):
    return random_calibration_items


def test_quantizers_are_created_on_the_module_device():
    model = build_tiny_sam().to("meta")
    quantize_(model, RULES)
    assert len(list(iter_quantizers(model))) > 10
    assert misplaced(model, torch.device("meta"), torch.float32) == []


def test_calibration_and_reconstruction_keep_the_model_dtype(items, tmp_path):
    model = float64_tiny()
    quantize_(model, RULES)
    assert misplaced(model, torch.device("cpu"), torch.float64) == []
    calibrate_(model, items, show_progress=False)
    assert all(q.is_calibrated for _, q in iter_quantizers(model))
    assert misplaced(model, torch.device("cpu"), torch.float64) == []
    reconstruct_(model, items, RECON, tmp_path, RunLogger(tmp_path), show_progress=False)
    harden_weights_(model)
    assert misplaced(model, torch.device("cpu"), torch.float64) == []


def test_set_range_and_load_keep_device_and_dtype():
    q = FakeQuantizer(QuantSpec(4, granularity="channel"), Role.WEIGHT, like=torch.zeros(3, 2, dtype=torch.float64))
    q.set_range(torch.full((3, 1), -1.0), torch.full((3, 1), 1.0))
    assert q.scale.dtype == torch.float64 and q.scale.shape == (3, 1)
    fresh = FakeQuantizer(q.spec, q.role, like=torch.zeros(3, 2, dtype=torch.float64, device="meta"))
    fresh.load_state_dict({k: v.float() for k, v in q.state_dict().items()}, assign=False)
    assert fresh.scale.device.type == "meta" and fresh.scale.dtype == torch.float64 and fresh.scale.shape == (3, 1)
