"""``Predictor``: SAM's predictor over an exported encoder / decoder pair, on a real runtime.

Pre- and post-processing are SAM's (resize the longest side, normalise, pad; bilinear upscaling of
the low-resolution logits, crop, resize to the original size), written with the same torch ops as
``saq.models.predictor`` so the runtime's outputs are the only difference to the PyTorch model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from saq.export.int8_exactness import saturation_warning
from saq.deploy.runtime import load_graph
from saq.export.onnx import read_manifest

BOX_LABELS = (2.0, 3.0)  # SAM's labels of a box's top-left and bottom-right corners
PAD_LABEL = -1.0


def bf16_warning(manifest: dict[str, Any], precision: str) -> str | None:
    """Why ``precision`` would cost this export accuracy, or None.

    Folded weight zero points (``weight_layout=symmetric`` on asymmetric weights) add a correction term,
    the input sum times s (2^(b-1) - z), to each Linear's output, exact only in a precision that holds the
    sum; bf16 keeps 8 significant bits: vit_t W8A8 minmax on coco8_seg went from 58.2 to 51.6
    mask AP under OpenVINO's bf16 rest (IoU against FP masks 0.940 -> 0.853), while a run with symmetric
    weights kept its accuracy (58.9 -> 59.3)."""
    if precision != "bf16":
        return None
    folded = [p["name"] for p in manifest["quantization_points"] if p["exported_as"].endswith("_zero_point_folded")]
    if not folded:
        return None
    return (f"precision=bf16 on an export with {len(folded)} folded weight zero points (e.g. {folded[0]}): their "
            "correction terms lose accuracy in bf16. Use precision fp32, or deploy a run quantized with "
            "quant.weight.symmetric=true (no folding).")


@dataclass
class RuntimeEncoding:
    """One image as the decoder needs it."""

    embedding: np.ndarray  # 1 x C x h x w
    input_size: tuple[int, int]
    original_size: tuple[int, int]


class Predictor:
    """``set_image(image)`` then ``predict(boxes=..., points=...)``, as segment-anything's SamPredictor."""

    def __init__(self, onnx_dir: str | Path, backend: str = "onnxruntime", num_threads: int | None = None,
                 precision: str = "fp32") -> None:
        self.onnx_dir = Path(onnx_dir).expanduser()
        self.manifest = read_manifest(self.onnx_dir)
        self.backend, self.precision = backend, precision
        # None where the runtime computes this export's integer products exactly on this CPU
        self.int8_warning = saturation_warning(self.manifest)
        if self.int8_warning:
            warnings.warn(self.int8_warning, RuntimeWarning, stacklevel=2)
        self.precision_warning = bf16_warning(self.manifest, precision)
        if self.precision_warning:
            warnings.warn(self.precision_warning, RuntimeWarning, stacklevel=2)
        pre = self.manifest["preprocessing"]
        self.image_size = int(pre["image_size"])
        self.pixel_mean = torch.tensor(pre["pixel_mean"]).view(-1, 1, 1)
        self.pixel_std = torch.tensor(pre["pixel_std"]).view(-1, 1, 1)
        self.mask_threshold = float(pre["mask_threshold"])
        self.transform = ResizeLongestSide(self.image_size)
        files = self.manifest["files"]
        self._encoder = load_graph(self.onnx_dir / files["encoder"]["path"], backend, num_threads, precision)
        self._decoder = load_graph(self.onnx_dir / files["decoder"]["path"], backend, num_threads, precision)
        self._encoding: RuntimeEncoding | None = None

    # image ----------------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """RGB uint8 H x W x 3 -> (normalised, padded 1 x 3 x S x S float32, size before padding)."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image H x W x 3, got shape {image.shape}")
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized).permute(2, 0, 1).contiguous().float()
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.image_size - w, 0, self.image_size - h))
        return x[None].numpy(), (int(h), int(w))

    def encode(self, image: np.ndarray) -> RuntimeEncoding:
        x, input_size = self.preprocess(image)
        embedding = self._encoder({"image": x})[0]
        return RuntimeEncoding(embedding, input_size, tuple(image.shape[:2]))

    def set_image(self, image: np.ndarray) -> None:
        self._encoding = self.encode(image)

    @property
    def encoding(self) -> RuntimeEncoding:
        if self._encoding is None:
            raise RuntimeError("call set_image(image) before predict()")
        return self._encoding

    # prompts ------------------------------------------------------------------------------------
    def prompt_arrays(self, encoding: RuntimeEncoding, boxes: Any = None, points: Any = None,
                      point_labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(N x P x 2 coords in the encoder's frame, N x P labels): points (shared by every box) then
        the box corners; without a box a padding point, as SAM's prompt encoder does."""
        if boxes is None and points is None:
            raise ValueError("predict needs boxes=... and/or points=...")
        parts_xy, parts_label = [], []
        n = 1
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            n = boxes.shape[0]
        if points is not None:
            points = np.asarray(points, dtype=np.float32).reshape(-1, 2)
            labels = np.ones(len(points), np.float32) if point_labels is None else np.asarray(point_labels, np.float32).reshape(-1)
            if labels.shape[0] != points.shape[0]:
                raise ValueError(f"{points.shape[0]} points but {labels.shape[0]} point_labels")
            coords = self.transform.apply_coords_torch(torch.from_numpy(points), encoding.original_size).numpy()
            parts_xy.append(np.broadcast_to(coords, (n, *coords.shape)))
            parts_label.append(np.broadcast_to(labels, (n, labels.shape[0])))
        if boxes is not None:
            corners = self.transform.apply_boxes_torch(torch.from_numpy(boxes), encoding.original_size).numpy().reshape(n, 2, 2)
            parts_xy.append(corners)
            parts_label.append(np.broadcast_to(np.array(BOX_LABELS, np.float32), (n, 2)))
        else:
            parts_xy.append(np.zeros((n, 1, 2), np.float32))
            parts_label.append(np.full((n, 1), PAD_LABEL, np.float32))
        return (np.ascontiguousarray(np.concatenate(parts_xy, 1), dtype=np.float32),
                np.ascontiguousarray(np.concatenate(parts_label, 1), dtype=np.float32))

    def decode(self, encoding: RuntimeEncoding, coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Low-resolution logits (N x M x 4h x 4w) and predicted IoU (N x M) of every mask token."""
        return tuple(self._decoder({"image_embeddings": encoding.embedding, "point_coords": coords,
                                    "point_labels": labels}))

    def postprocess(self, low_res: torch.Tensor, encoding: RuntimeEncoding) -> torch.Tensor:
        """Logits at the original image size (SAM's upscale, crop the padding, resize)."""
        masks = F.interpolate(low_res, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : encoding.input_size[0], : encoding.input_size[1]]
        return F.interpolate(masks, encoding.original_size, mode="bilinear", align_corners=False)

    def predict(self, boxes: Any = None, points: Any = None, point_labels: Any = None,
                multimask_output: bool = False, return_logits: bool = False):
        """(masks N x M x H x W, scores N x M, low-res logits N x M x 4h x 4w) as numpy arrays; N prompts
        (one per box, or one for points alone), M = 3 with ``multimask_output`` else 1."""
        encoding = self.encoding
        coords, labels = self.prompt_arrays(encoding, boxes, points, point_labels)
        low_res, iou = self.decode(encoding, coords, labels)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        low_res, iou = low_res[:, chosen], iou[:, chosen]
        masks = self.postprocess(torch.from_numpy(low_res), encoding)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks.numpy(), iou, low_res

    # evaluation (same contract as saq.models.predictor) ----------------------------------------------
    def decode_boxes(self, encoding: RuntimeEncoding, boxes_xyxy: torch.Tensor, batch_size: int = 16,
                     return_masks: bool = True):
        """Single-mask prediction per box: (bool masks N x H x W, predicted IoU N) as torch tensors."""
        if boxes_xyxy.numel() == 0:
            raise ValueError("no box prompts for this image: every evaluated image needs at least one box")
        masks, ious = [], []
        boxes = boxes_xyxy.float().numpy()
        for start in range(0, boxes.shape[0], batch_size):
            coords, labels = self.prompt_arrays(encoding, boxes=boxes[start:start + batch_size])
            low_res, iou = self.decode(encoding, coords, labels)
            ious.append(torch.from_numpy(iou[:, 0]))
            if return_masks:
                masks.append(self.postprocess(torch.from_numpy(low_res[:, :1]), encoding)[:, 0] > self.mask_threshold)
        return (torch.cat(masks) if return_masks else None), torch.cat(ious)
