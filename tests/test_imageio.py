"""Image reading survives odd files and names the file when it cannot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rdcd.errors import ImageReadError
from rdcd.imageio import list_images, read_array, read_rgb
from rdcd.preprocess import PreprocessSpec


@pytest.fixture
def photo(skimage_dir):
    return Image.open(skimage_dir / "chelsea.png").convert("RGB")


def test_exif_rotation_is_applied(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    photo.save(path, exif=exif)
    im = read_rgb(path)
    assert im.size == (photo.height, photo.width)


def test_cmyk_16bit_palette_alpha_float_and_bilevel(tmp_path, photo):
    cmyk = tmp_path / "cmyk.jpg"
    photo.convert("CMYK").save(cmyk)
    a = read_array(cmyk)
    assert a.shape == (photo.height, photo.width, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - np.asarray(photo, int)).mean() < 20

    g16 = (np.asarray(photo.convert("L"), np.uint16) * 257)
    p16 = tmp_path / "g16.png"
    Image.fromarray(g16).save(p16)  # 16-bit grayscale PNG
    a = read_array(p16)
    assert a.dtype == np.uint8 and a.shape[2] == 3
    assert np.abs(a[..., 0].astype(int) - np.asarray(photo.convert("L"), int)).max() <= 1  # not clipped to white

    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    pp = tmp_path / "pal.png"
    pal.save(pp, transparency=0)
    assert read_rgb(pp).mode == "RGB"

    rgba = photo.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[:50, :50, 3] = 0
    pa = tmp_path / "alpha.png"
    Image.fromarray(alpha, "RGBA").save(pa)
    out = read_array(pa)
    assert (out[:50, :50] == 255).all()  # transparent corner composited on white

    for mode in ("1", "LA"):
        p = tmp_path / f"m{mode}.png"
        photo.convert(mode).save(p)
        assert read_rgb(p).mode == "RGB"
    p = tmp_path / "i32.tiff"  # 32-bit integer pixels holding 16-bit values
    Image.fromarray(g16.astype(np.int32), "I").save(p)
    assert np.abs(read_array(p)[..., 0].astype(int) - np.asarray(photo.convert("L"), int)).max() <= 1

    p = tmp_path / "f.tiff"
    Image.fromarray(np.asarray(photo.convert("L"), np.float32) / 255.0, "F").save(p)
    assert read_array(p).mean() > 10


def test_animated_gif_gives_first_frame(skimage_dir):
    im = read_rgb(skimage_dir / "no_time_for_that_tiny.gif")
    assert im.mode == "RGB" and im.size[0] > 0


@pytest.mark.parametrize("content,needle", [(b"", "empty file"), (b"this is not an image", "not an image")])
def test_unreadable_files_name_the_file(tmp_path, content, needle):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=needle) as err:
        read_rgb(p)
    assert "bad.jpg" in str(err.value)


def test_truncated_and_missing(tmp_path, photo):
    full = tmp_path / "full.jpg"
    photo.save(full, quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_rgb(cut)
    with pytest.raises(ImageReadError, match="no such file"):
        read_rgb(tmp_path / "missing.png")


def test_decompression_bomb_guard(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(p)
    with pytest.raises(ImageReadError, match="decompression-bomb"):
        read_rgb(p, max_pixels=1_000_000)


def test_spec_resize_and_listing(tmp_path, photo):
    photo.save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg"]
    x = PreprocessSpec(size=64).load(tmp_path / "a.jpg")
    assert x.shape == (64, 64, 3) and x.dtype == np.uint8
