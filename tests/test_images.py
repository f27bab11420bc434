"""Tests for style_dreambooth.data.images: decoding, validation, listing and captions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from style_dreambooth.data.images import IMAGE_EXTENSIONS, list_images, load_image, read_caption
from style_dreambooth.errors import UserError

SIZE = (72, 64)  # >= 64 on both sides, non-square so size mix-ups show


def _raises_user_error(func, *args, **kwargs) -> str:
    """Call func, expect a UserError, check its message is one line and return it."""
    with pytest.raises(UserError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert message
    assert "\n" not in message and "\r" not in message
    return message


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _noise(size: tuple[int, int] = (96, 96)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _assert_rgb(img: Image.Image, size: tuple[int, int] = SIZE) -> np.ndarray:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size
    return np.asarray(img)


# --------------------------------------------------------------------------- constants


def test_image_extensions() -> None:
    from PIL import features

    plain = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
    assert IMAGE_EXTENSIONS == frozenset(plain | ({".avif"} if features.check("avif") else set()))
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- modes


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", SIZE, (10, 20, 30)), tmp_path / "a.png")
    arr = _assert_rgb(load_image(path))
    assert (arr == (10, 20, 30)).all()


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", SIZE, (255, 0, 0, 0))  # fully transparent red
    img.putpixel((1, 1), (255, 0, 0, 255))  # opaque red
    img.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black
    arr = _assert_rgb(load_image(_save(img, tmp_path / "a.png")))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[1, 1]) == (255, 0, 0)
    assert all(abs(int(v) - 127) <= 2 for v in arr[2, 2])


def test_la_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("LA", SIZE, (0, 0))
    img.putpixel((0, 0), (0, 255))
    arr = _assert_rgb(load_image(_save(img, tmp_path / "a.png")))
    assert tuple(arr[5, 5]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (0, 0, 0)


def test_pa_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("PA", SIZE)
    img.putpalette([0, 0, 255] + [0] * 765)
    img.putpixel((0, 0), (0, 255))
    path = _save(img, tmp_path / "a.tif")
    with Image.open(path) as check:
        assert check.mode == "PA"
    arr = _assert_rgb(load_image(path))
    assert tuple(arr[0, 0]) == (0, 0, 255)
    assert tuple(arr[5, 5]) == (255, 255, 255)


def _palette_image() -> Image.Image:
    img = Image.new("P", SIZE, 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # 0 = red, 1 = green
    img.putpixel((1, 1), 1)
    return img


def test_palette_without_transparency(tmp_path: Path) -> None:
    arr = _assert_rgb(load_image(_save(_palette_image(), tmp_path / "a.png")))
    assert tuple(arr[0, 0]) == (255, 0, 0)
    assert tuple(arr[1, 1]) == (0, 255, 0)


@pytest.mark.parametrize("ext", [".png", ".gif"])
def test_palette_with_transparency_becomes_white(tmp_path: Path, ext: str) -> None:
    path = _save(_palette_image(), tmp_path / f"a{ext}", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    arr = _assert_rgb(load_image(path))
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent red -> white
    assert tuple(arr[1, 1]) == (0, 255, 0)


def test_rgb_colour_key_transparency_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGB", SIZE, (1, 2, 3))
    img.putpixel((0, 0), (9, 9, 9))
    arr = _assert_rgb(load_image(_save(img, tmp_path / "a.png", transparency=(1, 2, 3))))
    assert tuple(arr[5, 5]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (9, 9, 9)


def test_cmyk_tiff_pure_cyan(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", SIZE, (255, 0, 0, 0)), tmp_path / "a.tiff")
    arr = _assert_rgb(load_image(path))
    assert np.abs(arr[0, 0].astype(int) - (0, 255, 255)).max() <= 3


def test_cmyk_jpeg_pure_cyan(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", SIZE, (255, 0, 0, 0)), tmp_path / "a.jpg", quality=95)
    arr = _assert_rgb(load_image(path))
    assert np.abs(arr[8, 8].astype(int) - (0, 255, 255)).max() <= 6


def _sixteen_bit_array() -> np.ndarray:
    arr = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint16)
    arr[0, 0] = 65535
    arr[0, 1] = 32768
    arr[0, 2] = 257
    return arr


def _assert_sixteen_bit_scaled(arr: np.ndarray) -> None:
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert all(abs(int(v) - 128) <= 1 for v in arr[0, 1])
    assert tuple(arr[0, 2]) == (1, 1, 1)
    assert tuple(arr[5, 5]) == (0, 0, 0)


def test_sixteen_bit_png(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_sixteen_bit_array()), tmp_path / "a.png")
    with Image.open(path) as check:
        assert check.mode in {"I;16", "I"}
    _assert_sixteen_bit_scaled(_assert_rgb(load_image(path)))


def test_sixteen_bit_big_endian_tiff(tmp_path: Path) -> None:
    data = _sixteen_bit_array().astype(">u2").tobytes()
    path = _save(Image.frombytes("I;16B", SIZE, data), tmp_path / "a.tif")
    with Image.open(path) as check:
        assert check.mode == "I;16B"
    _assert_sixteen_bit_scaled(_assert_rgb(load_image(path)))


def test_thirty_two_bit_integer_tiff(tmp_path: Path) -> None:
    path = _save(Image.fromarray(_sixteen_bit_array().astype(np.int32)), tmp_path / "a.tif")
    with Image.open(path) as check:
        assert check.mode == "I"
    _assert_sixteen_bit_scaled(_assert_rgb(load_image(path)))


def test_float_tiff_unit_range(tmp_path: Path) -> None:
    arr = np.zeros((SIZE[1], SIZE[0]), dtype=np.float32)
    arr[0, 0] = 1.0
    arr[0, 1] = 0.5
    path = _save(Image.fromarray(arr), tmp_path / "a.tif")
    with Image.open(path) as check:
        assert check.mode == "F"
    out = _assert_rgb(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert all(abs(int(v) - 128) <= 1 for v in out[0, 1])
    assert tuple(out[5, 5]) == (0, 0, 0)


def test_float_tiff_sixteen_bit_range(tmp_path: Path) -> None:
    arr = _sixteen_bit_array().astype(np.float32)
    path = _save(Image.fromarray(arr), tmp_path / "a.tif")
    _assert_sixteen_bit_scaled(_assert_rgb(load_image(path)))


def test_bilevel_and_greyscale(tmp_path: Path) -> None:
    one = Image.new("1", SIZE, 0)
    one.putpixel((0, 0), 1)
    arr = _assert_rgb(load_image(_save(one, tmp_path / "one.png")))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[5, 5]) == (0, 0, 0)

    grey = Image.new("L", SIZE, 77)
    arr = _assert_rgb(load_image(_save(grey, tmp_path / "grey.bmp")))
    assert (arr == 77).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = Image.new("RGB", (100, 70), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 30))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(stored, tmp_path / "photo.jpg", exif=exif, quality=95)

    arr = _assert_rgb(load_image(path), size=(70, 100))
    top_right = arr[5, -6].astype(int)
    top_left = arr[5, 5].astype(int)
    assert np.abs(top_right - (255, 0, 0)).max() <= 10  # the red corner moved to the top-right
    assert np.abs(top_left - (0, 0, 255)).max() <= 10


def test_returned_image_is_independent_of_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", SIZE, (1, 2, 3)), tmp_path / "a.png")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_file_raises(tmp_path: Path, ext: str) -> None:
    path = _save(_noise(), tmp_path / f"cut{ext}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _raises_user_error(load_image, path)
    assert str(path) in message
    assert "truncated or corrupt" in message


def test_random_bytes_raise(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    message = _raises_user_error(load_image, path)
    assert str(path) in message


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert str(path) in _raises_user_error(load_image, path)


def test_too_small_image_raises(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (32, 32)), tmp_path / "tiny.png")
    message = _raises_user_error(load_image, path)
    assert str(path) in message
    assert "32x32" in message


def test_min_size_uses_shorter_side(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (200, 63)), tmp_path / "strip.png")
    assert "200x63" in _raises_user_error(load_image, path)
    assert load_image(path, min_size=63).size == (200, 63)


def test_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    assert str(path) in _raises_user_error(load_image, path)


def test_truncated_setting_not_changed(tmp_path: Path) -> None:
    from PIL import ImageFile

    path = _save(_noise(), tmp_path / "cut.jpg")
    path.write_bytes(path.read_bytes()[:-200])
    _raises_user_error(load_image, path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- list_images


def test_list_images_missing_dir(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    message = _raises_user_error(list_images, path)
    assert str(path) in message and "instance dir" in message


def test_list_images_file_not_dir(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", SIZE), tmp_path / "a.png")
    message = _raises_user_error(list_images, path, role="class")
    assert str(path) in message and "class dir" in message


def test_list_images_empty_dir(tmp_path: Path) -> None:
    message = _raises_user_error(list_images, tmp_path)
    assert message == (
        f"instance dir '{tmp_path}' has no usable images (found 0 other files); add .png/.jpg images"
    )


def test_list_images_only_non_images(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "sub").mkdir()
    _save(Image.new("RGB", SIZE), tmp_path / "sub" / "hidden_away.png")
    message = _raises_user_error(list_images, tmp_path)
    assert message == (
        f"instance dir '{tmp_path}' has no usable images (found 2 other files); add .png/.jpg images"
    )


def test_list_images_returns_sorted_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _save(Image.new("RGB", SIZE, (255, 0, 0)), tmp_path / "b.JPG")
    _save(Image.new("RGB", SIZE, (0, 255, 0)), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n", encoding="utf-8")
    (tmp_path / "readme.md").write_text("notes")
    (tmp_path / ".hidden.png").write_bytes(b"garbage")
    (tmp_path / "subdir").mkdir()

    with caplog.at_level(logging.INFO, logger="style_dreambooth.data.images"):
        result = list_images(tmp_path)

    assert result == [tmp_path / "a.png", tmp_path / "b.JPG"]
    logged = caplog.text
    assert "readme.md" in logged
    assert "a.txt" not in logged
    assert ".hidden.png" not in logged


def test_list_images_corrupt_image_is_an_error(tmp_path: Path) -> None:
    _save(Image.new("RGB", SIZE), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    message = _raises_user_error(list_images, tmp_path)
    assert str(bad) in message


def test_list_images_small_image_is_an_error(tmp_path: Path) -> None:
    _save(Image.new("RGB", SIZE), tmp_path / "good.png")
    _save(Image.new("RGB", (40, 80)), tmp_path / "small.png")
    assert "small.png" in _raises_user_error(list_images, tmp_path)
    assert len(list_images(tmp_path, min_size=40)) == 2


# --------------------------------------------------------------------------- captions


def test_read_caption(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    assert read_caption(image) is None
    (tmp_path / "a.txt").write_text("  a painting of a fox \n\n", encoding="utf-8")
    assert read_caption(image) == "a painting of a fox"


def test_read_caption_keeps_dotted_stem(tmp_path: Path) -> None:
    (tmp_path / "img.v2.txt").write_text("dotted", encoding="utf-8")
    assert read_caption(tmp_path / "img.v2.png") == "dotted"


def test_read_caption_blank_is_none(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(" \n\t ", encoding="utf-8")
    assert read_caption(tmp_path / "a.png") is None


def test_read_caption_utf8_with_bom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufeffcafé au lait".encode("utf-8"))
    assert read_caption(tmp_path / "a.png") == "café au lait"


def test_read_caption_invalid_utf8(tmp_path: Path) -> None:
    caption = tmp_path / "a.txt"
    caption.write_bytes("caf\u00e9".encode("latin-1"))
    message = _raises_user_error(read_caption, tmp_path / "a.png")
    assert str(caption) in message


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_read_caption_unreadable(tmp_path: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root can read anything")
    caption = tmp_path / "a.txt"
    caption.write_text("x", encoding="utf-8")
    caption.chmod(0)
    try:
        assert str(caption) in _raises_user_error(read_caption, tmp_path / "a.png")
    finally:
        caption.chmod(0o644)
