"""quantize_ keeps upstream numerics when off, keeps Parameters, and follows the rules."""

import numpy as np
import pytest
import torch

from saq.models import build_model, build_tiny_sam
from saq.nn import (QuantConv2d, QuantLinear, QuantRule, QuantTwoWayAttention, QuantViTAttention, dequantize_,
                    quantize_)
from saq.quant import QuantMode, QuantSpec, set_quant_mode
from saq.models.predictor import decode_boxes, encode_image

W8 = QuantSpec(8, granularity="channel")
A8 = QuantSpec(8)
ALL = [QuantRule("*", W8, A8)]


def _predict(model, image, boxes):
    masks, iou = decode_boxes(model, encode_image(model, image), boxes)
    return encode_image(model, image).embedding, masks, iou


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)


def test_tiny_quantizers_off_bit_identical(image):
    reference = build_tiny_sam(seed=1).eval()
    model = build_tiny_sam(seed=1).eval()
    layout = quantize_(model, ALL)
    kinds = {v["kind"] for v in layout.values()}
    assert {"linear", "conv2d", "vit_attention", "two_way_attention"} <= kinds
    boxes = torch.tensor([[10.0, 10.0, 60.0, 80.0], [0.0, 0.0, 127.0, 95.0]])
    with torch.no_grad():
        for a, b in zip(_predict(reference, image, boxes), _predict(model, image, boxes)):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_vit_t_quantizers_off_match_upstream_mobile_sam(vit_t_checkpoint):
    mobile_sam = pytest.importorskip("mobile_sam")
    upstream = mobile_sam.build_sam_vit_t(checkpoint=str(vit_t_checkpoint)).eval()
    model = build_model({"name": "vit_t", "checkpoint": str(vit_t_checkpoint)})
    layout = quantize_(model, ALL)
    assert any(v["kind"] == "tinyvit_attention" for v in layout.values())
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.image_encoder(x)
        theirs = upstream.image_encoder(x)
        assert torch.equal(ours, theirs)
        pe = model.prompt_encoder.get_dense_pe()
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor([[100.0, 200.0, 600.0, 700.0]]), masks=None)
        a = model.mask_decoder(ours, pe, sparse, dense, multimask_output=False)
        b = upstream.mask_decoder(theirs, upstream.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_parameters_are_shared_and_keys_kept():
    model = build_tiny_sam()
    params_before = dict(model.named_parameters())
    keys_before = set(model.state_dict())
    quantize_(model, ALL)
    params_after = dict(model.named_parameters())
    assert params_before.keys() == params_after.keys()
    assert all(params_before[k] is params_after[k] for k in params_before)
    new_keys = set(model.state_dict()) - keys_before
    assert keys_before <= set(model.state_dict())
    assert new_keys and all(k.endswith(("scale", "zero_point")) for k in new_keys)
    dequantize_(model)
    assert set(model.state_dict()) == keys_before
    assert not any(isinstance(m, (QuantLinear, QuantConv2d, QuantViTAttention)) for m in model.modules())


def test_rules_first_match_wins_and_keep_fp():
    model = build_tiny_sam()
    rules = [QuantRule("prompt_encoder*"), QuantRule("mask_decoder.iou_prediction_head*"),
             QuantRule("image_encoder*", QuantSpec(4, granularity="channel"), None),
             QuantRule("mask_decoder*", W8, A8)]
    layout = quantize_(model, rules)
    assert not any(n.startswith(("prompt_encoder", "mask_decoder.iou_prediction_head")) for n in layout)
    enc = [v for n, v in layout.items() if n.startswith("image_encoder")]
    assert enc and all(v["weight"]["bits"] == 4 and v["act"] is None for v in enc)
    # weight-only encoder: its attention gets no quantization points
    assert not any(v["kind"] == "vit_attention" for v in enc)
    attn = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    assert isinstance(attn, QuantTwoWayAttention)
    assert {"q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer"} <= set(attn.quantizers())
    assert isinstance(attn.q_proj, QuantLinear) and attn.q_proj.input_quantizer is not None


def test_quantized_forward_changes_output(image):
    """Sanity check that QUANTIZE mode really does something (the test above is not vacuous)."""
    from saq.ptq.calibrate import calibrate_weights_

    model = build_tiny_sam(seed=1).eval()
    quantize_(model, [QuantRule("*", QuantSpec(2, granularity="channel"), None)])
    calibrate_weights_(model)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 80.0]])
    with torch.no_grad():
        set_quant_mode(model, QuantMode.OFF)
        fp = encode_image(model, image).embedding
        set_quant_mode(model, QuantMode.QUANTIZE)
        q = encode_image(model, image).embedding
    assert not torch.equal(fp, q)
