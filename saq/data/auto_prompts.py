"""Box prompts from the FP model itself: a point grid, SAM's multimask output, filtering and box NMS.

For unlabeled images (e.g. :func:`saq.data.folder.folder_dataset`). The boxes of the confident, stable FP
masks become the prompts that both the FP and the quantized model are then evaluated on, so the comparison
(fidelity) uses the same prompts everywhere. Results can be cached per image and model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import nms
from tqdm.auto import tqdm

from saq.data.coco import CocoInstances, DatasetError, load_image
from saq.data.prompts import Prompt
from saq.models.finite import has_non_finite, non_finite_error
from saq.utils.hashing import file_hexdigest
from saq.models.predictor import EncodedImage, encode_image
from saq.utils.run_files import write_json

CACHE_VERSION = 1  # bump when the prompt definition changes, so old cache files are ignored
_POINT_BATCH = 16  # single-point prompts decoded together
_PIXEL_BUDGET = 1 << 25  # float elements of full-size logits held at once (128 MiB)


@dataclass(frozen=True)
class _Candidates:
    boxes: torch.Tensor  # N x 4, xyxy with exclusive right/bottom edges
    scores: torch.Tensor  # N, predicted IoU


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha1 over the names, dtypes, shapes and bytes of the model's state_dict tensors."""
    digest = hashlib.sha1()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if not isinstance(value, torch.Tensor):  # e.g. extra state objects
            digest.update(repr(value).encode())
            continue
        t = value.detach()
        if t.is_quantized:
            t = t.dequantize()
        t = t.cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        # A byte view works for every dtype numpy lacks (bfloat16, float8).
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _point_grid(n: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """n*n cell centres (x, y) in original image pixels, row by row."""
    xs = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * (width / n)
    ys = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * (height / n)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def _mask_stats(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For K x H x W logits: area, stability score and bounding box (exclusive x1, y1) of each mask."""
    fg = logits > threshold
    area = fg.sum(dim=(1, 2))
    inter = (logits > threshold + 1.0).sum(dim=(1, 2))
    union = (logits > threshold - 1.0).sum(dim=(1, 2))
    stability = inter.float() / union.clamp(min=1).float()  # an empty mask scores 0, not NaN
    height, width = fg.shape[-2:]
    rows, cols = fg.any(dim=2), fg.any(dim=1)
    ys = torch.arange(height, device=fg.device)
    xs = torch.arange(width, device=fg.device)
    x0 = torch.where(cols, xs, width).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, height).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    return area, stability, torch.stack([x0, y0, x1, y1], dim=1).float()


def _candidates(model: torch.nn.Module, encoded: EncodedImage, points_per_side: int, pred_iou_thresh: float,
                stability_thresh: float, min_area: float) -> _Candidates:
    """Masks of single-point prompts that pass the IoU, stability and area filters."""
    height, width = encoded.original_size
    device = encoded.embedding.device
    points = _point_grid(points_per_side, height, width, device)
    image_pe = model.prompt_encoder.get_dense_pe()
    img_size = model.image_encoder.img_size
    per_chunk = max(1, _PIXEL_BUDGET // (img_size * img_size + height * width))
    boxes, scores = [], []
    for start in range(0, points.shape[0], _POINT_BATCH):
        coords = encoded.transform.apply_coords_torch(points[start:start + _POINT_BATCH, None, :],
                                                      encoded.original_size)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)
        sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low_res, iou = model.mask_decoder(image_embeddings=encoded.embedding, image_pe=image_pe,
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=True)
        low_res, iou = low_res.flatten(0, 1), iou.flatten().float()
        # Upsampling is the costly part: only masks whose predicted IoU passes get it.
        passing = torch.nonzero(iou >= pred_iou_thresh).flatten()
        for chunk in passing.split(per_chunk):
            logits = model.postprocess_masks(low_res[chunk, None], encoded.input_size, encoded.original_size)[:, 0]
            area, stability, box = _mask_stats(logits.float(), float(model.mask_threshold))
            keep = (stability >= stability_thresh) & (area >= min_area)
            boxes.append(box[keep])
            scores.append(iou[chunk][keep])
    if not boxes:
        return _Candidates(torch.zeros(0, 4, device=device), torch.zeros(0, device=device))
    return _Candidates(torch.cat(boxes), torch.cat(scores))


def _select(candidates: _Candidates, box_nms_thresh: float, max_prompts: int) -> list[Prompt]:
    """Greedy box NMS ranked by predicted IoU; the best ``max_prompts`` as prompts, best first."""
    if candidates.scores.numel() == 0:
        return []
    # A stable pre-sort makes ties resolve by grid order, whatever nms does internally.
    order = torch.sort(candidates.scores, descending=True, stable=True).indices
    boxes, scores = candidates.boxes[order].cpu(), candidates.scores[order].cpu()
    keep = nms(boxes, scores, float(box_nms_thresh))[:max_prompts]
    prompts = [Prompt(tuple(float(v) for v in boxes[i].tolist()), float(scores[i]), 1, None) for i in keep.tolist()]
    return sorted(prompts, key=lambda p: -p.score)


def _params(points_per_side: int, pred_iou_thresh: float, stability_thresh: float, box_nms_thresh: float,
            max_prompts: int, min_area_frac: float, mask_threshold: float) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "points_per_side": int(points_per_side),
            "pred_iou_thresh": float(pred_iou_thresh), "stability_thresh": float(stability_thresh),
            "box_nms_thresh": float(box_nms_thresh), "max_prompts": int(max_prompts),
            "min_area_frac": float(min_area_frac), "mask_threshold": float(mask_threshold)}


def _cache_key(image_sha1: str, fingerprint: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"image": image_sha1, "model": fingerprint, "params": params}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _read_cache(path: Path) -> list[Prompt] | None:
    """The prompts stored at ``path``, or None when it is absent or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text())["prompts"]
        return [Prompt((float(r[0]), float(r[1]), float(r[2]), float(r[3])), float(r[4]), 1, None) for r in rows]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _write_cache(path: Path, prompts: list[Prompt], meta: dict[str, Any]) -> None:
    """Written atomically so that parallel runs never read a half-written file."""
    write_json(path, {**meta, "prompts": [[*p.box_xyxy, p.score] for p in prompts]})


@torch.no_grad()
def auto_box_prompts(model: torch.nn.Module, dataset: CocoInstances, points_per_side: int = 8,
                     pred_iou_thresh: float = 0.8, stability_thresh: float = 0.85, box_nms_thresh: float = 0.7,
                     max_prompts: int = 16, min_area_frac: float = 0.001, cache_dir: Path | None = None,
                     show_progress: bool = True) -> dict[int, list[Prompt]]:
    """Box prompts per image from the model's own confident, stable masks of a points_per_side^2 point grid.

    Deterministic. Images where no mask survives map to an empty list. With ``cache_dir`` each image's prompts
    are stored under a key of (image bytes, model weights, parameters), so reruns skip the model entirely.
    """
    if points_per_side < 1 or max_prompts < 1:
        raise ValueError(f"points_per_side ({points_per_side}) and max_prompts ({max_prompts}) must be >= 1")
    params = _params(points_per_side, pred_iou_thresh, stability_thresh, box_nms_thresh, max_prompts,
                     min_area_frac, model.mask_threshold)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    fingerprint = model_fingerprint(model) if cache is not None else ""
    # Eval mode for the call (BatchNorm in MobileSAM would otherwise use batch statistics and update its
    # running stats); every module's own mode is restored afterwards.
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        return _prompts_per_image(model, dataset, params, cache, fingerprint, show_progress)
    finally:
        for module, training in modes.items():
            module.training = training


def _prompts_per_image(model: torch.nn.Module, dataset: CocoInstances, params: dict[str, Any], cache: Path | None,
                       fingerprint: str, show_progress: bool) -> dict[int, list[Prompt]]:
    """The loop of :func:`auto_box_prompts`: cached prompts where present, else computed (and stored)."""
    prompts: dict[int, list[Prompt]] = {}
    for img in tqdm(dataset.images, desc="auto prompts", disable=not show_progress, leave=False):
        path = None
        if cache is not None:
            try:
                image_sha1 = file_hexdigest(img.path, "sha1")
            except OSError as exc:
                raise DatasetError(f"cannot read image {img.path}: {exc}") from exc
            path = cache / f"{_cache_key(image_sha1, fingerprint, params)}.json"
            cached = _read_cache(path)
            if cached is not None:
                prompts[img.id] = cached
                continue
        image = load_image(img.path)
        encoded = encode_image(model, image)
        if has_non_finite(encoded.embedding):  # NaN logits would silently yield no prompts at all
            raise non_finite_error(model, image, img.path, "auto prompts")
        height, width = encoded.original_size
        # At least one pixel: an empty mask has no box.
        min_area = max(1.0, params["min_area_frac"] * height * width)
        candidates = _candidates(model, encoded, params["points_per_side"], params["pred_iou_thresh"],
                                 params["stability_thresh"], min_area)
        prompts[img.id] = _select(candidates, params["box_nms_thresh"], params["max_prompts"])
        if path is not None:
            _write_cache(path, prompts[img.id], {"image": str(img.path), "params": params})
    return prompts
