"""The one image reader: conversions, EXIF policy and counted failure reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from legion.data.images import ImageReadError, read_image, read_image_info, read_image_size

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)


def test_rgb_png_is_read_exactly(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    result = read_image_info(tmp_path / "a.png")
    assert result.conversion is None and result.source_mode == "RGB"
    np.testing.assert_array_equal(result.image, RGB)


def test_rgba_drops_alpha_like_cv2(tmp_path):
    rgba = np.dstack([RGB, RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    result = read_image_info(tmp_path / "a.png")
    assert result.conversion == "drop_alpha"
    np.testing.assert_array_equal(result.image, RGB)


def test_gray_and_palette_become_rgb(tmp_path):
    gray = RGB[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (9, 13, 3) and all(np.array_equal(out[:, :, c], gray) for c in range(3))
    pal = Image.fromarray(RGB).quantize(8)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB"))
    result = read_image_info(tmp_path / "p.png")
    assert result.conversion == "palette->rgb"
    np.testing.assert_array_equal(result.image, expected)


def test_16bit_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")  # uint16 -> mode I;16, a 16-bit PNG
    result = read_image_info(tmp_path / "d.png")
    assert result.conversion is not None and result.source_mode.startswith("I")
    assert result.image[0, :, 0].tolist() == [0, 1, 255, 128]
    import cv2

    np.testing.assert_array_equal(result.image, cv2.imread(str(tmp_path / "d.png"), cv2.IMREAD_COLOR)[..., ::-1])


def test_cmyk_jpeg_converted(tmp_path):
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    result = read_image_info(tmp_path / "c.jpg")
    assert result.source_mode == "CMYK" and result.conversion == "cmyk->rgb"
    assert result.image.shape == (9, 13, 3) and result.image.dtype == np.uint8


def test_exif_orientation_is_ignored(tmp_path):
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" on display; the stored pixels stay 20 x 40
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    with Image.open(tmp_path / "r.jpg") as check:
        assert check.getexif().get(0x0112) == 6
    assert read_image(tmp_path / "r.jpg").shape == (20, 40, 3)
    assert read_image_size(tmp_path / "r.jpg") == (20, 40)


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, payload, reason",
    [
        ("missing.png", None, "missing"),
        ("noise.png", b"\x89PNG not really" * 10, "corrupt"),
        ("text.jpg", b"hello", "corrupt"),
        ("half.png", "half", "truncated"),
    ],
)
def test_unusable_files_raise_with_reason(tmp_path, name, payload, reason):
    path = tmp_path / name
    if payload == "half":
        data = _png_bytes(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        path.write_bytes(data[: len(data) // 2])
    elif payload is not None:
        path.write_bytes(payload)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.reason == reason and str(path) in str(info.value)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[:-400])
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "t.jpg")
    assert info.value.reason == "truncated"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "big.png", max_pixels=300 * 200 - 1)
    assert info.value.reason == "decompression_bomb"
    assert read_image(tmp_path / "big.png", max_pixels=300 * 200).shape == (200, 300, 3)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path)
    assert info.value.reason == "not_a_file"


def test_16bit_colour_keeps_the_high_byte_and_is_counted(tmp_path):
    import cv2

    bgr = np.zeros((4, 5, 3), np.uint16)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 300, 257 * 100, 65535
    cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    result = read_image_info(tmp_path / "c16.png")
    assert result.conversion == "rgb16->rgb"
    assert result.image[0, 0].tolist() == [255, 100, 1]  # RGB = high bytes of (65535, 25700, 300)
    np.testing.assert_array_equal(result.image, cv2.imread(str(tmp_path / "c16.png"), cv2.IMREAD_COLOR)[..., ::-1])
