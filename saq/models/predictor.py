"""Box-prompt prediction with SAM's own pre/post-processing (resize longest side, normalise, pad).

Encoder and decoder are separate calls so that calibration, evaluation and timing share them.
All geometry follows the model's ``image_encoder.img_size``; nothing assumes 1024 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass
class EncodedImage:
    embedding: torch.Tensor  # 1 x C x h x w
    input_size: tuple[int, int]  # resized size before padding
    original_size: tuple[int, int]
    transform: ResizeLongestSide


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def encoded_image(model: Sam, embedding: torch.Tensor, original_size: tuple[int, int]) -> EncodedImage:
    """An image embedding computed elsewhere (the neck's output on a cached input) with the sizes that
    :func:`encode_image` would record for an image of ``original_size`` (height, width)."""
    transform = ResizeLongestSide(model.image_encoder.img_size)
    input_size = transform.get_preprocess_shape(*original_size, model.image_encoder.img_size)
    return EncodedImage(embedding, tuple(input_size), tuple(original_size), transform)


@torch.no_grad()
def encode_image(model: Sam, image: np.ndarray) -> EncodedImage:
    """Run the image encoder on an RGB uint8 HxWx3 image."""
    transform = ResizeLongestSide(model.image_encoder.img_size)
    resized = transform.apply_image(image)
    x = torch.as_tensor(resized, device=model_device(model)).permute(2, 0, 1).contiguous()[None].float()
    input_size = tuple(x.shape[-2:])
    embedding = model.image_encoder(model.preprocess(x))
    return EncodedImage(embedding, input_size, tuple(image.shape[:2]), transform)


@torch.no_grad()
def decoder_batches(model: Sam, encoded: EncodedImage, boxes_xyxy: torch.Tensor, batch_size: int = 16
                    ) -> Iterator[dict[str, Any]]:
    """The mask decoder's keyword arguments for each batch of at most ``batch_size`` boxes (single-mask
    output), the prompt encoder run on the batch."""
    if boxes_xyxy.numel() == 0:
        raise ValueError("no box prompts for this image: every evaluated or calibration image needs at least one box")
    device = encoded.embedding.device
    boxes = encoded.transform.apply_boxes_torch(boxes_xyxy.to(device).float(), encoded.original_size)
    image_pe = model.prompt_encoder.get_dense_pe()
    for start in range(0, boxes.shape[0], batch_size):
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes[start:start + batch_size], masks=None)
        yield {"image_embeddings": encoded.embedding, "image_pe": image_pe, "sparse_prompt_embeddings": sparse,
               "dense_prompt_embeddings": dense, "multimask_output": False}


@torch.no_grad()
def decode_boxes(model: Sam, encoded: EncodedImage, boxes_xyxy: torch.Tensor, batch_size: int = 16,
                 return_masks: bool = True):
    """Single-mask prediction for each box: (bool masks N x H x W at original size, predicted IoU N)."""
    masks, ious = [], []
    for inputs in decoder_batches(model, encoded, boxes_xyxy, batch_size):
        low_res, iou = model.mask_decoder(**inputs)
        ious.append(iou[:, 0])
        if return_masks:
            full = model.postprocess_masks(low_res, encoded.input_size, encoded.original_size)
            masks.append(full[:, 0] > model.mask_threshold)
    return (torch.cat(masks) if return_masks else None), torch.cat(ious)
