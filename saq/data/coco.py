"""COCO-format instance datasets, optionally several concatenated into one evaluation set."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np
from PIL import Image

from saq.data.pixels import UnsupportedImageError, to_rgb8
from saq.utils.errors import SaqUserError

log = logging.getLogger(__name__)


class DatasetError(SaqUserError, ValueError):
    """An annotation file or image folder is missing or malformed."""


@dataclass(frozen=True)
class ImageRecord:
    id: int  # id in the (merged) evaluation set
    path: Path
    width: int
    height: int
    set_name: str
    source_id: int  # id in the set's own annotation file (detector results refer to it)


@dataclass
class CocoInstances:
    """Images, instance annotations and categories, in COCO ``instances`` layout."""

    images: list[ImageRecord]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    set_names: list[str] = field(default_factory=list)
    # annotations left out because the file lists no image with their image_id (reported, not silent)
    orphan_annotations: int = 0

    def __post_init__(self) -> None:
        self._by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in self.annotations:
            self._by_image.setdefault(ann["image_id"], []).append(ann)
        self._images = {img.id: img for img in self.images}

    def __len__(self) -> int:
        return len(self.images)

    def image(self, image_id: int) -> ImageRecord:
        return self._images[image_id]

    def annotations_of(self, image_id: int) -> list[dict[str, Any]]:
        return self._by_image.get(image_id, [])

    def subset(self, image_ids: Iterable[int]) -> "CocoInstances":
        keep = set(image_ids)
        return CocoInstances([i for i in self.images if i.id in keep],
                             [a for a in self.annotations if a["image_id"] in keep], self.categories, self.set_names)

    def to_coco_dict(self) -> dict[str, Any]:
        """The ground truth as a pycocotools-ready dict."""
        return {
            "images": [{"id": i.id, "width": i.width, "height": i.height, "file_name": str(i.path)} for i in self.images],
            "annotations": self.annotations,
            "categories": self.categories,
        }


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3: every PIL mode converted faithfully (16-bit and float images rescaled by their
    range, saq.data.pixels), or refused naming the file."""
    try:
        with Image.open(path) as img:
            return to_rgb8(img)
    except UnsupportedImageError as exc:
        raise DatasetError(f"cannot use image {path}: {exc}") from None
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except Exception as exc:  # PIL raises several types for unreadable files
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def verify_images(dataset: CocoInstances, key: str = "data.images") -> None:
    """Every image exists, its header is readable and gives the annotated size; the pixels are not decoded.

    Run before the model touches any image, so that a missing file fails in seconds, not hours in."""
    missing = [img.path for img in dataset.images if not img.path.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(dataset.images)} images not found (first: {missing[0]}); "
                           f"check {key} (the folder that annotation file names are relative to)")
    for img in dataset.images:
        try:
            with Image.open(img.path) as opened:
                size = opened.size
        except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
            raise DatasetError(f"cannot read image {img.path} ({type(exc).__name__}: {exc}); replace or remove "
                               f"it, or point {key} elsewhere") from exc
        if size != (img.width, img.height):
            raise DatasetError(f"image {img.path} is {size[0]}x{size[1]} but its annotation says "
                               f"{img.width}x{img.height}; fix the annotation file or the image")


def _image_file(images_dir: Path, file_name: str, ann_path: Path) -> Path:
    """``images_dir / file_name``, refusing names that leave the folder (``../``, absolute paths)."""
    relative = Path(file_name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DatasetError(f"{ann_path}: image file_name {file_name!r} points outside data.images ({images_dir}); "
                           "file names must be paths inside that folder: fix the annotation file")
    return images_dir / relative


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}. Set data.annotations to a COCO instances json")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"annotation file {path} is not valid JSON ({exc}); is it truncated or corrupt?") from exc
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise DatasetError(f"annotation file {path} is not in COCO instances format: it needs "
                           "'images', 'annotations' and 'categories' lists")
    return data


def _matches(image: Mapping[str, Any], where: Mapping[str, Any] | None) -> bool:
    return not where or all(image.get(k) == v for k, v in where.items())


def _refuse_duplicate_ids(records: list[dict], kind: str, ann_path: Path) -> None:
    """Two records with one id make every per-image result ambiguous (COCOeval then scores garbage)."""
    seen: set = set()
    duplicates = sorted({r["id"] for r in records if "id" in r and (r["id"] in seen or seen.add(r["id"]))})
    if duplicates:
        raise DatasetError(f"{ann_path}: duplicate {kind} ids {duplicates[:5]}{' ...' if len(duplicates) > 5 else ''} "
                           f"({len(duplicates)} in all); every {kind} needs its own id")


def _check_box(ann: dict, ann_path: Path) -> None:
    """A box prompt needs four finite numbers with positive width and height."""
    box = ann["bbox"]
    ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    if ok:
        ok = all(math.isfinite(v) for v in box) and box[2] > 0 and box[3] > 0
    if not ok:
        raise DatasetError(f"{ann_path}: annotation {ann.get('id')} (image {ann.get('image_id')}) has the box {box}; "
                           "a box is [x, y, width, height] with finite values and width, height > 0")


class CocoFile(NamedTuple):
    """One annotation file as read: the images kept, every annotation of a listed image, the categories."""
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    images_dir: Path
    orphan_annotations: int  # annotations whose image_id the file does not list (left out, logged)


def load_coco_set(name: str, images: str | Path, annotations: str | Path, where: Mapping[str, Any] | None = None,
                  max_images: int | None = None) -> CocoFile:
    """Read one annotation file; ``where`` keeps images whose fields equal the given values and
    ``max_images`` the first N of those (by image id)."""
    images_dir, ann_path = Path(images).expanduser(), Path(annotations).expanduser()
    if not images_dir.is_dir():
        raise DatasetError(f"image folder not found for data set '{name}': {images_dir}. Set data.images")
    data = _read_json(ann_path)
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("image_id", "category_id", "bbox", "segmentation") if k not in ann]
        if missing:
            raise DatasetError(f"{ann_path}: annotation #{i} lacks {missing}")
    _refuse_duplicate_ids(data["images"], "image", ann_path)
    _refuse_duplicate_ids(data["annotations"], "annotation", ann_path)
    for ann in data["annotations"]:
        _check_box(ann, ann_path)
    for img in data["images"]:
        _image_file(images_dir, str(img.get("file_name", "")), ann_path)
    imgs = [img for img in data["images"] if _matches(img, where)]
    if where and not imgs:
        raise DatasetError(f"{ann_path}: no image matches data.where={dict(where)}")
    if max_images is not None:
        imgs = sorted(imgs, key=lambda img: img["id"])[: int(max_images)]
    listed = {img["id"] for img in data["images"]}
    orphans = sum(1 for ann in data["annotations"] if ann["image_id"] not in listed)
    if orphans:
        log.warning("%s: %d of %d annotations name an image id the file does not list; they are left out",
                    ann_path, orphans, len(data["annotations"]))
    return CocoFile(imgs, [a for a in data["annotations"] if a["image_id"] in listed], data["categories"], images_dir,
                    orphans)


def build_dataset(sets: list[Mapping[str, Any]]) -> CocoInstances:
    """Concatenate COCO sets into one, with fresh image/annotation/category ids.

    Categories are kept apart per set (``set/name``) so that AP never mixes classes of two sets.
    """
    images: list[ImageRecord] = []
    annotations: list[dict[str, Any]] = []
    categories: list[dict[str, Any]] = []
    names = []
    orphans = 0
    for spec in sets:
        name = spec["name"]
        names.append(name)
        raw = load_coco_set(name, spec["images"], spec["annotations"], spec.get("where"), spec.get("max_images"))
        raw_images, raw_anns, raw_cats, images_dir = raw.images, raw.annotations, raw.categories, raw.images_dir
        orphans += raw.orphan_annotations
        single = len(sets) == 1
        cat_map = {}
        for cat in raw_cats:
            cat_map[cat["id"]] = cat["id"] if single else len(categories) + 1
            categories.append({**cat, "id": cat_map[cat["id"]], "name": cat["name"] if single else f"{name}/{cat['name']}"})
        img_map = {}
        for img in raw_images:
            new_id = img["id"] if single else len(images) + 1
            img_map[img["id"]] = new_id
            images.append(ImageRecord(new_id, images_dir / str(img["file_name"]), int(img["width"]), int(img["height"]),
                                      name, img["id"]))
        for ann in raw_anns:
            if ann["image_id"] not in img_map:
                continue
            if ann["category_id"] not in cat_map:
                raise DatasetError(f"data set '{name}': annotation {ann.get('id')} has unknown category {ann['category_id']}")
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": img_map[ann["image_id"]],
                                "category_id": cat_map[ann["category_id"]], "iscrowd": int(ann.get("iscrowd", 0)),
                                "area": float(ann.get("area", ann["bbox"][2] * ann["bbox"][3]))})
    if not images:
        raise DatasetError("the data sets hold no images")
    return CocoInstances(images, annotations, categories, names, orphan_annotations=orphans)


def coco_dataset_from_config(cfg: Mapping[str, Any]) -> CocoInstances:
    """A ``data`` node of kind coco: one set (name/images/annotations/where) plus optional ``extra`` sets.
    Every kind: ``saq.data.dataset_from_config``."""
    main = {k: cfg.get(k) for k in ("name", "images", "annotations", "where", "max_images")}
    return build_dataset([main, *list(cfg.get("extra") or [])])
