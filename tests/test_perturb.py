"""Robustness perturbations: RGB uint8 in, RGB uint8 out, explicit recorded parameters."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from legion.data.perturb import opencv_gaussian_sigma, parse_perturbation


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    base = np.zeros((48, 64, 3), np.uint8)
    base[:, :32] = (200, 30, 60)  # a sharp edge and colour, so blur/JPEG change something
    base[10:20, 40:60] = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    return base


def test_none_is_identity(image):
    for spec in (None, "", "none"):
        p = parse_perturbation(spec)
        assert p(image) is image and p.describe() == {"kind": None}


def test_jpeg_matches_pillow_round_trip(image):
    p = parse_perturbation("jpeg:50")
    out = p(image)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=50, subsampling="4:2:0")
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    assert p.describe()["quality"] == 50
    # lower quality -> larger error
    err = lambda q: np.abs(parse_perturbation(f"jpeg:{q}")(image).astype(int) - image).mean()
    assert err(10) > err(95)


def test_noise_is_seeded_per_key_and_scaled_in_0_255_units(image):
    p = parse_perturbation("noise:5", seed=3)
    a, b = p(image, key="x.png"), p(image, key="x.png")
    np.testing.assert_array_equal(a, b)  # same key -> same noise
    assert not np.array_equal(a, p(image, key="y.png"))  # other key -> other noise
    assert not np.array_equal(a, parse_perturbation("noise:5", seed=4)(image, key="x.png"))
    flat = np.full((200, 200, 3), 128, np.uint8)
    diff = parse_perturbation("noise:5")(flat, key="k").astype(float) - 128
    assert diff.std() == pytest.approx(5.0, rel=0.05) and abs(diff.mean()) < 0.1
    assert parse_perturbation("noise:0")(image, key="k").tolist() == image.tolist()
    # without a key: seeded by the pixels, so independent of call order (and of data-loader workers)
    other = image.copy()
    other[0, 0, 0] ^= 1
    fresh = parse_perturbation("noise:5", seed=3)
    first, _, again = fresh(image), fresh(other), fresh(image)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, parse_perturbation("noise:5", seed=3)(image))
    assert not np.array_equal(first[1:] - image[1:].astype(np.int16), fresh(other)[1:] - other[1:].astype(np.int16))
    clipped = parse_perturbation("noise:50")(np.full((50, 50, 3), 250, np.uint8), key="k")
    assert clipped.dtype == np.uint8 and clipped.max() == 255
    assert parse_perturbation("noise:5", seed=3).describe() == {
        "kind": "noise",
        "sigma_0_255": 5.0,
        "mean": 0.0,
        "seed": 3,
    }


def test_blur_uses_opencv_sigma_rule(image):
    assert opencv_gaussian_sigma(5) == pytest.approx(1.1)
    p = parse_perturbation("blur:5")  # the reference: cv2.GaussianBlur(img, (5, 5), 0)
    assert p.describe()["sigma"] == 0.0 and "OpenCV default" in p.describe()["sigma_rule"]
    np.testing.assert_array_equal(p(image), cv2.GaussianBlur(image, (5, 5), 0))
    assert not np.array_equal(p(image), image)
    q = parse_perturbation("blur:7:2.5")
    np.testing.assert_array_equal(q(image), cv2.GaussianBlur(image, (7, 7), 2.5))
    assert str(q) == "blur:7:2.5" and "sigma_rule" not in q.describe()


@pytest.mark.parametrize(
    "spec",
    [
        "jpeg",
        "jpeg:0",
        "jpeg:101",
        "jpeg:50.5",
        "noise:-1",
        "noise:abc",
        "blur:4",
        "blur:0",
        "blur:5:-1",
        "sharpen:3",
        "jpeg:50:1",
    ],
)
def test_bad_specs_raise(spec):
    with pytest.raises(ValueError, match="perturbation"):
        parse_perturbation(spec)


def test_rejects_non_rgb_uint8(image):
    p = parse_perturbation("blur:3")
    with pytest.raises(ValueError, match="RGB uint8"):
        p(image.astype(np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        p(image[..., 0])
