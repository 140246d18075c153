"""One source of calibration images for every stage of a run.

Each image is decoded from disk once, and its FP image embedding is computed once (all quantizers off)
and then shared: BIG, PCC, the observers and reconstruction's captures read the same arrays instead of
decoding (and encoding) the same files once per stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from saq.data.coco import load_image
from saq.models.predictor import EncodedImage, encode_image
from saq.quant.quantizer import QuantMode, quant_mode


class ImageSource:
    """Decoded images by path, and FP embeddings by path for ``model``.

    The FP embeddings stay valid while the encoder's floating-point weights do, i.e. until weights are
    hardened onto their grid, which happens after every stage; ``forget_embeddings`` drops them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._images: dict[Path, np.ndarray] = {}
        self._fp_embeddings: dict[Path, EncodedImage] = {}
        self.decoded = 0  # files read from disk
        self.fp_encoded = 0  # FP encoder passes

    def image(self, path: Path) -> np.ndarray:
        """The RGB uint8 image at ``path`` (read from disk on first use)."""
        path = Path(path)
        if path not in self._images:
            self._images[path] = load_image(path)
            self.decoded += 1
        return self._images[path]

    @torch.no_grad()
    def fp_embedding(self, path: Path) -> EncodedImage:
        """The FP model's image embedding of ``path`` (quantizers off; computed on first use)."""
        path = Path(path)
        if path not in self._fp_embeddings:
            with quant_mode(self.model, QuantMode.OFF):
                self._fp_embeddings[path] = encode_image(self.model, self.image(path))
            self.fp_encoded += 1
        return self._fp_embeddings[path]

    def forget_embeddings(self) -> None:
        self._fp_embeddings.clear()
