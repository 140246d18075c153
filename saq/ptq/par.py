"""Prompt-Aware Reconstruction (PAR): judge an encoder stage by what the mask decoder makes of it.

Layer skipping: a stage's output goes straight to the FP neck and then to the frozen FP two-way
transformer together with the prompt tokens of that image; the loss compares the transformer's
updated image tokens. This needs every stage to have the neck's input width (true for SAM's ViTs).
TinyViT's stages have different widths and no projection to the neck, so ``vit_t`` falls back to
the plain stage-output MSE (see ``supports_layer_skipping``).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from saq.data.calibration import CalibrationItem
from saq.quant.quantizer import QuantMode, quant_mode

HEAD_PREFIXES = ("image_encoder.neck.", "mask_decoder.")


def supports_layer_skipping(model: nn.Module) -> bool:
    return isinstance(model.image_encoder, ImageEncoderViT)


class PromptAwareHead:
    """Maps a stage output (1 x H x W x C) of calibration item ``i`` to the decoder's image tokens."""

    def __init__(self, model: nn.Module, items: list[CalibrationItem]) -> None:
        if not supports_layer_skipping(model):
            raise ValueError("PAR layer skipping needs a ViT encoder whose stages share the neck's width")
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

    def __call__(self, stage_output: torch.Tensor, i: int) -> torch.Tensor:
        decoder = self.model.mask_decoder
        sparse, dense = self.prompts[i]
        with quant_mode(self.model, QuantMode.OFF, where=lambda name, q: name.startswith(HEAD_PREFIXES)):
            embedding = self.model.image_encoder.neck(stage_output.permute(0, 3, 1, 2))
            tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
            tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
            src = torch.repeat_interleave(embedding, tokens.shape[0], dim=0) + dense
            pos = torch.repeat_interleave(self.image_pe, tokens.shape[0], dim=0)
            _, keys = decoder.transformer(src, pos, tokens)
        return keys  # prompts x HW x C: the updated image tokens
