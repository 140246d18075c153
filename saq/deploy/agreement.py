"""How closely can an exported model agree with the fake-quant model it came from?

Two float32 implementations of the same quantized network never agree bit for bit: their kernels add in
different orders. Where such a one-ulp difference lands next to a rounding boundary, an activation code
flips by one step, and the flipped value moves later codes: on a network with large activation tensors
(vit_t W8A8) the difference grows layer by layer until it is about one quantization step, whichever
implementation made the first flip. The fake-quant model run with 1 or 2 torch threads differs from
itself by as much as it differs from onnxruntime.

So the agreement of a deployed model is read against two references measured on the same prompts:
- the fake-quant model against itself with its encoder's input moved by one ulp (``one_ulp_input``): the
  agreement that float summation order alone allows (``fake_quant_float_order_mIoU``);
- the runtime's decoder on the fake-quant image embeddings (``FakeQuantEmbeddings``): the export of the
  prompt encoder and mask decoder checked without the encoder's float-order differences.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from saq.deploy.predictor import Predictor, RuntimeEncoding
from saq.models.predictor import encode_image


def _next_float_up(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x, *rest = args
    return (torch.nextafter(x, torch.full_like(x, float("inf"))), *rest)


@contextmanager
def one_ulp_input(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every input of ``model.image_encoder`` is moved up by one float32 ulp: the
    smallest difference between two implementations of the preprocessing."""
    handle = model.image_encoder.register_forward_pre_hook(_next_float_up)
    try:
        yield
    finally:
        handle.remove()


class FakeQuantEmbeddings:
    """A runtime predictor whose encoder is replaced by the fake-quant model's: ``encode`` gives the
    fake-quant embedding, ``decode_boxes`` runs the runtime's decoder on it (``evaluate_runtime``'s contract)."""

    def __init__(self, predictor: Predictor, model: torch.nn.Module) -> None:
        self.predictor, self.model = predictor, model

    def encode(self, image: np.ndarray) -> RuntimeEncoding:
        encoded = encode_image(self.model, image)
        return RuntimeEncoding(encoded.embedding.detach().cpu().numpy().astype(np.float32, copy=False),
                               tuple(encoded.input_size), tuple(encoded.original_size))

    def decode_boxes(self, encoding: RuntimeEncoding, boxes_xyxy: torch.Tensor, batch_size: int = 16,
                     return_masks: bool = True):
        return self.predictor.decode_boxes(encoding, boxes_xyxy, batch_size, return_masks)
