"""Data and prompt sources chosen by config: COCO-format sets, image folders, scikit-image photos;
ground-truth, detector or automatic (FP-model) box prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from saq.data.coco import CocoInstances, coco_dataset_from_config
from saq.data.prompts import Prompt, labelled_prompts_from_config


def dataset_from_config(cfg: Mapping[str, Any]) -> CocoInstances:
    """``data`` node: kind coco (default), folder (data.images = any folder of images) or skimage
    (data.photos = names of scikit-image sample photos, written once to data.images)."""
    kind = cfg.get("kind", "coco")
    if kind == "coco":
        return coco_dataset_from_config(cfg)
    from saq.data.folder import folder_dataset, skimage_photos

    if kind == "skimage":
        skimage_photos(cfg["images"], list(cfg["photos"]))
        # Only the listed photos, numbered in listed order: the shared folder may hold other configs' photos.
        by_name = {img.path.name: img for img in folder_dataset(cfg["images"], cfg.get("name", "skimage")).images}
        images = [dataclasses.replace(by_name[f"{name}.png"], id=i, source_id=i)
                  for i, name in enumerate(cfg["photos"], start=1)]
        return CocoInstances(images, [], [{"id": 1, "name": "object"}], [cfg.get("name", "skimage")])
    if kind == "folder":
        return folder_dataset(cfg["images"], cfg.get("name", "folder"), cfg.get("max_images"), int(cfg.get("skip", 0)))
    raise ValueError(f"unknown data.kind {kind!r}: use coco, folder or skimage")


def prompts_from_config(cfg: Mapping[str, Any], dataset: CocoInstances, model: torch.nn.Module | None = None,
                        show_progress: bool = True) -> dict[int, list[Prompt]]:
    """``prompts`` node: gt, detector, or auto (boxes of the FP model's confident masks; needs ``model``)."""
    if cfg["source"] != "auto":
        return labelled_prompts_from_config(cfg, dataset)
    if model is None:
        raise ValueError("prompts=auto needs the FP model")
    from saq.data.auto_prompts import auto_box_prompts

    return auto_box_prompts(model, dataset, points_per_side=int(cfg["points_per_side"]),
                            pred_iou_thresh=float(cfg["pred_iou_thresh"]), stability_thresh=float(cfg["stability_thresh"]),
                            box_nms_thresh=float(cfg["box_nms_thresh"]), max_prompts=int(cfg["max_prompts"]),
                            min_area_frac=float(cfg["min_area_frac"]),
                            cache_dir=Path(cfg["cache_dir"]) if cfg.get("cache_dir") else None, show_progress=show_progress)


def run_evaluation_dataset(trained: Mapping[str, Any], data_cfg: Mapping[str, Any] | None = None) -> CocoInstances:
    """The images a ``saq.ptq`` run (its resolved config ``trained``) evaluated on: its ``data`` set without
    the calibration images it held out. ``data_cfg``: another set to evaluate on instead (nothing held out)."""
    dataset = dataset_from_config(data_cfg if data_cfg is not None else trained["data"])
    if data_cfg is None and trained["calib"].get("exclude_from_eval"):
        used = set(trained["calib"].get("selected", []))
        dataset = dataset.subset(i.id for i in dataset.images if str(i.path) not in used)
    return dataset
