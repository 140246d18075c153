"""Every PIL image mode loads as the 8-bit RGB picture it shows (16-bit and float images rescaled by
their range, not saturated), or is refused naming the file."""

import numpy as np
import pytest
from PIL import Image

from saq.data.coco import DatasetError, load_image
from saq.data.pixels import UnsupportedImageError, to_rgb8


def _gray() -> np.ndarray:
    """A 48x64 8-bit picture using the full range 0..255 (a gradient plus a bright square)."""
    gray = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    gray[10:20, 10:20] = 200
    return gray


def _rgb() -> np.ndarray:
    gray = _gray()
    return np.stack([gray, gray[::-1], np.roll(gray, 7, axis=1)], axis=2)


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _save(tmp_path, name: str, img: Image.Image):
    path = tmp_path / name
    img.save(path)
    return path


# name -> (file name, image built from the 8-bit picture, the 8-bit RGB it must load as)
def _cases():
    gray, rgb = _gray(), _rgb()
    return {
        "L": ("l.png", lambda: Image.fromarray(gray), _as_rgb(gray)),
        "16-bit PNG": ("i16.png", lambda: Image.fromarray(gray.astype(np.uint16) * 257), _as_rgb(gray)),
        "16-bit TIFF": ("i16.tif", lambda: Image.fromarray(gray.astype(np.uint16) * 257), _as_rgb(gray)),
        "12 bits in a 16-bit PNG": ("i12.png", lambda: Image.fromarray(gray.astype(np.uint16) * 16), _as_rgb(gray)),
        "32-bit integer TIFF": ("i32.tif", lambda: Image.fromarray(gray.astype(np.int32) * 1000), _as_rgb(gray)),
        "float TIFF": ("f.tif", lambda: Image.fromarray(gray.astype(np.float32) / 255), _as_rgb(gray)),
        "RGB": ("rgb.png", lambda: Image.fromarray(rgb), rgb),
        "RGBA": ("rgba.png", lambda: Image.fromarray(np.dstack([rgb, np.full(gray.shape, 90, np.uint8)])), rgb),
        "LA": ("la.png", lambda: Image.fromarray(np.dstack([gray, np.full(gray.shape, 90, np.uint8)])), _as_rgb(gray)),
        "palette": ("p.png", lambda: Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
                    _as_rgb(gray)),
        "CMYK": ("cmyk.tif", lambda: Image.fromarray(rgb).convert("CMYK"), rgb),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_each_mode_loads_as_the_8_bit_picture(case, tmp_path):
    file_name, build, expected = _cases()[case]
    path = _save(tmp_path, file_name, build())
    loaded = load_image(path)
    assert loaded.dtype == np.uint8 and loaded.shape == expected.shape
    assert np.abs(loaded.astype(int) - expected.astype(int)).max() <= 1, case


def test_a_saturating_conversion_would_fail_this_check(tmp_path):
    """The check above can fail: PIL's own conversion of the 16-bit picture is far from it."""
    path = _save(tmp_path, "i16.png", Image.fromarray(_gray().astype(np.uint16) * 257))
    with Image.open(path) as img:
        saturated = np.asarray(img.convert("RGB"))
    assert np.abs(saturated.astype(int) - _as_rgb(_gray()).astype(int)).max() > 100


def test_a_constant_16_bit_image_is_black_not_an_error(tmp_path):
    path = _save(tmp_path, "flat.png", Image.fromarray(np.full((8, 8), 1234, np.uint16)))
    assert (load_image(path) == 0).all()


def test_nan_pixels_are_refused_naming_the_file(tmp_path):
    pixels = (_gray().astype(np.float32) / 255)
    pixels[3, 3] = np.nan
    path = _save(tmp_path, "nan.tif", Image.fromarray(pixels))
    with pytest.raises(DatasetError, match=r"nan\.tif.*NaN"):
        load_image(path)


def test_a_mode_without_a_faithful_conversion_is_refused():
    with pytest.raises(UnsupportedImageError, match="'HSV'"):
        to_rgb8(Image.new("HSV", (4, 4)))
