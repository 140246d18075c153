"""Unlabeled image folders: odd formats and sizes, clear errors, ordering, skimage sample photos."""

import numpy as np
import pytest
from PIL import Image

from saq.data.coco import DatasetError, load_image
from saq.data.folder import folder_dataset, skimage_photos


def _write_odd_images(folder):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), mode="L").save(folder / "a_gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 50, 4), dtype=np.uint8), mode="RGBA").save(folder / "b_rgba.PNG")
    Image.fromarray(rng.integers(0, 255, (33, 17, 3), dtype=np.uint8)).convert("P").save(folder / "c_palette.gif.bmp")
    Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(folder / "d_tiny.jpg")
    Image.new("RGB", (5000, 3000), (10, 200, 30)).save(folder / "e_huge.JPEG", quality=50)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(b"resource fork")


def test_odd_images_sizes_from_headers(tmp_path):
    _write_odd_images(tmp_path)
    ds = folder_dataset(tmp_path, name="odd")
    names = [i.path.name for i in ds.images]
    assert names == ["a_gray.png", "b_rgba.PNG", "c_palette.gif.bmp", "d_tiny.jpg", "e_huge.JPEG"]
    assert [i.id for i in ds.images] == [1, 2, 3, 4, 5] and [i.source_id for i in ds.images] == [1, 2, 3, 4, 5]
    assert {i.set_name for i in ds.images} == {"odd"} and ds.set_names == ["odd"]
    assert ds.categories == [{"id": 1, "name": "object"}] and ds.annotations == []
    assert [(i.width, i.height) for i in ds.images] == [(30, 40), (50, 20), (17, 33), (8, 6), (5000, 3000)]
    for rec in ds.images[:4]:
        pixels = load_image(rec.path)
        assert pixels.shape == (rec.height, rec.width, 3) and pixels.dtype == np.uint8
    assert ds.to_coco_dict()["images"][4]["width"] == 5000


def test_huge_image_decodes_to_rgb(tmp_path):
    Image.new("L", (5000, 3000), 7).save(tmp_path / "huge.png")
    (rec,) = folder_dataset(tmp_path).images
    assert (rec.width, rec.height) == (5000, 3000)
    assert load_image(rec.path).shape == (3000, 5000, 3)


def test_broken_file_is_named(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(DatasetError, match=r"broken\.jpg.*delete or replace"):
        folder_dataset(tmp_path)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"not found.*data\.images="):
        folder_dataset(tmp_path / "nope")
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match=r"holds no images.*\.jpg.*\.webp"):
        folder_dataset(tmp_path)


def test_sorting_skip_and_max_images(tmp_path):
    for name in ["10.png", "02.png", "b.jpg", "a.webp", "01.tif"]:
        Image.new("RGB", (3, 2)).save(tmp_path / name)
    assert [i.path.name for i in folder_dataset(tmp_path).images] == ["01.tif", "02.png", "10.png", "a.webp", "b.jpg"]
    ds = folder_dataset(tmp_path, skip=1, max_images=2)
    assert [i.path.name for i in ds.images] == ["02.png", "10.png"] and [i.id for i in ds.images] == [1, 2]
    assert [i.path.name for i in folder_dataset(tmp_path, skip=3).images] == ["a.webp", "b.jpg"]
    with pytest.raises(DatasetError, match="leaves none"):
        folder_dataset(tmp_path, skip=5)
    with pytest.raises(ValueError, match="negative"):
        folder_dataset(tmp_path, skip=-1)


def test_skimage_photos_round_trip(tmp_path):
    dest = skimage_photos(tmp_path / "photos", ["coins", "chelsea", "horse", "motorcycle_left"])
    ds = folder_dataset(dest)
    assert [i.path.name for i in ds.images] == ["chelsea.png", "coins.png", "horse.png", "motorcycle_left.png"]
    assert [(i.width, i.height) for i in ds.images] == [(451, 300), (384, 303), (400, 328), (741, 500)]
    assert load_image(ds.images[2].path).max() == 255  # the bool horse became a visible 0/255 image
    before = (dest / "coins.png").stat().st_mtime_ns
    skimage_photos(dest, ["coins"])
    assert (dest / "coins.png").stat().st_mtime_ns == before  # existing files are kept


def test_skimage_photos_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown skimage\.data photo.*'lena'.*astronaut"):
        skimage_photos(tmp_path, ["lena"])
    try:
        import pooch  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="'eagle' is not available offline"):
            skimage_photos(tmp_path, ["eagle"])
