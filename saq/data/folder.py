"""Any folder of images as an unlabeled data set (no annotations), plus scikit-image's sample photos.

Such a set has no ground truth, so its prompts come from elsewhere (e.g. :mod:`saq.data.auto_prompts`)
and it is evaluated by fidelity (quantized vs FP masks) only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from saq.data.coco import CocoInstances, DatasetError, ImageRecord
from saq.utils.run_files import atomic_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# name -> (skimage.data function, index into its tuple result or None, the file it reads). 2-D photos only.
_SKIMAGE_PHOTOS: dict[str, tuple[str, int | None, str]] = {
    **{n: (n, None, f"{n}.png") for n in (
        "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel", "horse", "logo",
        "microaneurysms", "moon", "page", "text", "eagle")},
    "cat": ("cat", None, "chelsea.png"),
    "checkerboard": ("checkerboard", None, "chessboard_GRAY.png"),
    "clock": ("clock", None, "clock_motion.png"),
    "colorwheel": ("colorwheel", None, "color.png"),
    "hubble_deep_field": ("hubble_deep_field", None, "hubble_deep_field.jpg"),
    "immunohistochemistry": ("immunohistochemistry", None, "ihc.png"),
    "retina": ("retina", None, "retina.jpg"),
    "rocket": ("rocket", None, "rocket.jpg"),
    "shepp_logan_phantom": ("shepp_logan_phantom", None, "phantom.png"),
    "skin": ("skin", None, "skin.jpg"),
    "motorcycle_left": ("stereo_motorcycle", 0, "motorcycle_left.png"),
    "motorcycle_right": ("stereo_motorcycle", 1, "motorcycle_right.png"),
}


def _image_files(folder: Path) -> list[Path]:
    # Hidden files (e.g. macOS "._x.jpg" resource forks) are not images even with an image suffix.
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; the pixels are not decoded."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, DecompressionBombError)
        raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc}); "
                           "delete or replace this file, or move it out of data.images") from exc


def folder_dataset(images: str | Path, name: str = "folder", max_images: int | None = None,
                   skip: int = 0) -> CocoInstances:
    """Every image file of ``images`` (sorted by file name, then ``[skip:skip+max_images]``), ids 1..N.

    One category ``object`` and no annotations. Sizes are read from the headers, so huge images are cheap.
    """
    folder = Path(images).expanduser()
    if skip < 0 or (max_images is not None and max_images < 0):
        raise ValueError(f"skip ({skip}) and max_images ({max_images}) must not be negative")
    if not folder.is_dir():
        raise DatasetError(f"image folder not found for data set '{name}': {folder}. "
                           "Set data.images=... to a folder of images")
    files = _image_files(folder)
    if not files:
        raise DatasetError(f"image folder {folder} holds no images: expected files ending in "
                           f"{', '.join(IMAGE_EXTENSIONS)} (any case). Set data.images=... to another folder")
    selected = files[skip:] if max_images is None else files[skip:skip + max_images]
    if not selected:
        raise DatasetError(f"image folder {folder} has {len(files)} images, but skip={skip} "
                           f"max_images={max_images} leaves none")
    records = []
    for i, path in enumerate(selected, start=1):
        width, height = _image_size(path)
        records.append(ImageRecord(i, path, int(width), int(height), name, i))
    return CocoInstances(records, [], [{"id": 1, "name": "object"}], [name])


def skimage_photos(dest: str | Path, names: list[str]) -> Path:
    """Write the named ``skimage.data`` photos as ``<dest>/<name>.png`` (existing files are kept); returns ``dest``.

    Bundled in the scikit-image wheel, so available offline: astronaut, brick, camera, cat, cell, checkerboard,
    chelsea, clock, coffee, coins, colorwheel, grass, gravel, horse, hubble_deep_field, immunohistochemistry,
    logo, microaneurysms, moon, motorcycle_left, motorcycle_right, page, retina, rocket, shepp_logan_phantom,
    text. ``eagle`` and ``skin`` need the optional ``pooch`` package and a download; without them this raises
    a DatasetError naming the image.
    """
    import skimage.data
    from skimage.util import img_as_ubyte

    unknown = [n for n in names if n not in _SKIMAGE_PHOTOS]
    if unknown:
        raise ValueError(f"unknown skimage.data photo(s) {unknown}; choose from {', '.join(sorted(_SKIMAGE_PHOTOS))}")
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = dest / f"{name}.png"
        if target.is_file():
            continue
        func, index, filename = _SKIMAGE_PHOTOS[name]
        # Check first: without pooch, skimage would skip the calling test under pytest instead of raising.
        if not (Path(skimage.data.__file__).parent / filename).is_file() and importlib.util.find_spec("pooch") is None:
            raise DatasetError(f"skimage.data photo '{name}' is not available offline: it is not bundled with "
                               "scikit-image and needs the pooch package and a download; pick a bundled one")
        try:
            data = getattr(skimage.data, func)()
        except Exception as exc:  # ModuleNotFoundError without pooch, ConnectionError offline
            raise DatasetError(f"skimage.data photo '{name}' is not available offline "
                               f"({type(exc).__name__}: {exc}); pick one bundled with scikit-image") from exc
        array = np.asarray(data if index is None else data[index])
        if array.dtype != np.uint8:  # horse is bool, shepp_logan_phantom float
            array = img_as_ubyte(array)
        # A temporary file of this writer's own: no truncated PNG after a kill, and concurrent jobs of a
        # sweep filling the same cache never share a temporary file.
        with atomic_file(target) as f:
            Image.fromarray(array).save(f, format="PNG")
    return dest
