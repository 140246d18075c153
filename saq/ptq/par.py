"""Prompt-Aware Reconstruction (PAR): judge an encoder stage by what the mask decoder makes of it.

Layer skipping: a stage's output goes straight to the FP neck and then to the frozen FP two-way
transformer together with the prompt tokens of that image; the loss compares the transformer's
updated image tokens. It is defined for every stage whose output already has the neck's input shape
(width and 64 x 64 grid): all stages of SAM's ViTs, and TinyViT's last two layers (320 channels on the
64 x 64 grid). TinyViT's first two layers (128 channels on 128 x 128, 160 on 64 x 64) have no such
path, and the reconstruction stage uses the plain stage-output MSE for them.
"""

from __future__ import annotations

import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from saq.data.calibration import CalibrationItem
from saq.models.units import as_neck_input
from saq.quant.quantizer import QuantMode, quant_mode

HEAD_PREFIXES = ("image_encoder.neck.", "mask_decoder.")


class PromptAwareHead:
    """Maps a stage output of calibration item ``i`` to the decoder's updated image tokens."""

    def __init__(self, model: nn.Module, items: list[CalibrationItem]) -> None:
        self.model = model
        device = next(model.parameters()).device
        transform = ResizeLongestSide(model.image_encoder.img_size)
        self.prompts = []
        with torch.no_grad(), quant_mode(model, QuantMode.OFF):
            self.image_pe = model.prompt_encoder.get_dense_pe()
            for item in items:
                boxes = torch.tensor([p.box_xyxy for p in item.prompts], device=device, dtype=torch.float32)
                boxes = transform.apply_boxes_torch(boxes, (item.image.height, item.image.width))
                self.prompts.append(model.prompt_encoder(points=None, boxes=boxes, masks=None))

    def accepts(self, stage_output: torch.Tensor) -> bool:
        """Whether layer skipping is defined for a stage with this output shape."""
        return as_neck_input(self.model, stage_output) is not None

    def __call__(self, stage_output: torch.Tensor, i: int) -> torch.Tensor:
        neck_input = as_neck_input(self.model, stage_output)
        if neck_input is None:
            raise ValueError(f"a stage output of shape {tuple(stage_output.shape)} cannot feed the neck")
        decoder = self.model.mask_decoder
        sparse, dense = self.prompts[i]
        with quant_mode(self.model, QuantMode.OFF, where=lambda name, q: name.startswith(HEAD_PREFIXES)):
            embedding = self.model.image_encoder.neck(neck_input)
            tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
            tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
            src = torch.repeat_interleave(embedding, tokens.shape[0], dim=0) + dense
            pos = torch.repeat_interleave(self.image_pe, tokens.shape[0], dim=0)
            _, keys = decoder.transformer(src, pos, tokens)
        return keys  # prompts x HW x C: the updated image tokens
