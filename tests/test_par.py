"""PAR's layer-skipping target is exactly what the FP decoder makes of a stage output."""

import torch

from saq.data import dataset_from_config, gt_prompts, select_calibration
from saq.data.coco import load_image
from saq.eval.predictor import decode_boxes, encode_image
from saq.models import build_tiny_sam
from saq.models.units import reconstruction_units, vit_stages
from saq.ptq.capture import capture_inputs
from saq.ptq.par import PromptAwareHead, supports_layer_skipping


def test_par_target_equals_fp_decoder_tokens(coco8):
    ds = dataset_from_config(coco8)
    items = select_calibration(ds, gt_prompts(ds), 2, "first", max_prompts_per_image=3)
    model = build_tiny_sam(seed=4).eval()
    assert supports_layer_skipping(model) and len(vit_stages(model.image_encoder)) == 1
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
