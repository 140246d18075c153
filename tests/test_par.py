"""PAR's layer-skipping target is exactly what the FP decoder makes of a stage output."""

import pytest
import torch

from saq.data import dataset_from_config, gt_prompts, select_calibration
from saq.data.coco import load_image
from saq.models.predictor import decode_boxes, encode_image
from saq.models import build_architecture, build_tiny_sam
from saq.models.units import reconstruction_units, vit_stages
from saq.ptq.capture import capture_inputs
from saq.ptq.par import PromptAwareHead, as_neck_input


def test_par_target_equals_fp_decoder_tokens(coco8):
    ds = dataset_from_config(coco8)
    items = select_calibration(ds, gt_prompts(ds), 2, "first", max_prompts_per_image=3)
    model = build_tiny_sam(seed=4).eval()
    assert len(vit_stages(model.image_encoder)) == 1
    head = PromptAwareHead(model, items)
    last_stage = reconstruction_units(model, "stage")[0]
    for i, item in enumerate(items):
        image = load_image(item.image.path)
        stage_input = capture_inputs(model, [last_stage.entry], [item], torch.device("cpu"))[last_stage.entry][0]
        captured = {}
        handle = model.mask_decoder.transformer.register_forward_hook(
            lambda module, inputs, output: captured.update(keys=output[1]))
        try:
            decode_boxes(model, encode_image(model, image), torch.tensor([p.box_xyxy for p in item.prompts]),
                         return_masks=False)
        finally:
            handle.remove()
        with torch.no_grad():
            tokens = head(last_stage.run(model, *stage_input), i)
        assert tokens.shape == captured["keys"].shape
        torch.testing.assert_close(tokens, captured["keys"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_vit_t_layer_skipping_only_where_the_stage_output_fits_the_neck(coco8):
    """TinyViT layers 2 and 3 end at 320 channels on the 64 x 64 grid (the neck's input); 0 and 1 do not.
    Through the last layer, layer skipping is the encoder itself: the head must give the decoder's tokens."""
    ds = dataset_from_config(coco8)
    items = select_calibration(ds, gt_prompts(ds), 1, "first", max_prompts_per_image=2)
    torch.manual_seed(0)
    model = build_architecture("vit_t").eval()
    stages = [u for u in reconstruction_units(model, "stage", ("encoder",)) if u.kind == "stage"]
    inputs = capture_inputs(model, [u.entry for u in stages], items, torch.device("cpu"))
    head = PromptAwareHead(model, items)
    with torch.no_grad():
        outputs = [u.run(model, *inputs[u.entry][0]) for u in stages]
        assert [head.accepts(out) for out in outputs] == [False, False, True, True]
        assert as_neck_input(model, outputs[0]) is None
        tokens = head(outputs[-1], 0)

    captured = {}
    handle = model.mask_decoder.transformer.register_forward_hook(
        lambda module, inputs, output: captured.update(keys=output[1]))
    try:
        image = load_image(items[0].image.path)
        decode_boxes(model, encode_image(model, image), torch.tensor([p.box_xyxy for p in items[0].prompts]),
                     return_masks=False)
    finally:
        handle.remove()
    torch.testing.assert_close(tokens, captured["keys"], rtol=1e-4, atol=1e-4)
