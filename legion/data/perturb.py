"""Robustness perturbations (paper supplement Table 10; docs/metrics.md §8).

One perturbation at a time, applied to the **RGB uint8** image as read from disk, before any
CLIP/SAM preprocessing; the result is rounded and clipped back to uint8. Parameters are explicit
and recorded (``Perturbation.describe()``); the reference's defects (BGR input to kornia's JPEG,
noise std not divided by 255) are not reproduced.

Spec strings (``parse_perturbation``):
    jpeg:Q              JPEG encode + decode with libjpeg (Pillow), quality Q in 1..100, 4:2:0 chroma
    noise:SIGMA         additive Gaussian noise, SIGMA in 0-255 units, seeded
    blur:K[:SIGMA]      cv2.GaussianBlur with an odd kernel size K; SIGMA 0 or omitted = what the
                        reference does (σ = 0 passed to OpenCV: its fixed binomial table for K <= 7,
                        e.g. [1 4 6 4 1]/16 for K = 5, else σ = 0.3 * ((K - 1) / 2 - 1) + 0.8)
    none / ""           no perturbation

Noise seeding: each call draws from a generator seeded by (seed, crc32(key)) with
``perturb(image, key="name.png")``, or by (seed, crc32(pixels)) without a key. An image therefore
gets the same noise whatever the order of images, the number of data-loader workers or the run.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np

KINDS = ("jpeg", "noise", "blur")


def opencv_gaussian_sigma(kernel_size: int) -> float:
    """The σ OpenCV derives from the kernel size when σ = 0 and K > 7 (smaller K: a fixed table)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


@dataclass
class Perturbation:
    """A callable ``image [H, W, 3] uint8 RGB -> image [H, W, 3] uint8 RGB``."""

    kind: str | None  # "jpeg" | "noise" | "blur" | None (identity)
    value: float = 0.0  # quality / sigma (0-255) / kernel size
    sigma: float = 0.0  # blur only: the Gaussian σ actually used
    seed: int = 0

    def describe(self) -> dict:
        """Parameters to record next to results."""
        if self.kind is None:
            return {"kind": None}
        if self.kind == "jpeg":
            return {"kind": "jpeg", "quality": int(self.value), "codec": "libjpeg via Pillow", "subsampling": "4:2:0"}
        if self.kind == "noise":
            return {"kind": "noise", "sigma_0_255": float(self.value), "mean": 0.0, "seed": self.seed}
        desc = {"kind": "blur", "kernel_size": int(self.value), "sigma": float(self.sigma), "border": "reflect_101"}
        if self.sigma == 0:
            desc["sigma_rule"] = (
                f"OpenCV default for sigma=0 (fixed table for K<=7, else {opencv_gaussian_sigma(int(self.value)):.4g})"
            )
        return desc

    def __str__(self) -> str:
        if self.kind is None:
            return "none"
        if self.kind == "blur":
            return f"blur:{int(self.value)}:{self.sigma:g}"
        return f"{self.kind}:{self.value:g}"

    def __call__(self, image: np.ndarray, key: str | None = None) -> np.ndarray:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"perturbations take RGB uint8 images [H, W, 3], got {image.dtype} {image.shape}")
        if self.kind is None:
            return image
        if self.kind == "jpeg":
            return _jpeg(image, int(self.value))
        if self.kind == "noise":
            digest = zlib.crc32(np.ascontiguousarray(image).data) if key is None else zlib.crc32(key.encode("utf-8"))
            rng = np.random.default_rng([self.seed, digest])
            noisy = image.astype(np.float32) + rng.normal(0.0, self.value, image.shape).astype(np.float32)
            return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        import cv2

        k = int(self.value)
        return cv2.GaussianBlur(
            np.ascontiguousarray(image), (k, k), sigmaX=self.sigma, sigmaY=self.sigma, borderType=cv2.BORDER_REFLECT_101
        )


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def parse_perturbation(spec: str | None, seed: int = 0) -> Perturbation:
    """``"jpeg:50" | "noise:5" | "blur:5" | "blur:5:1.5" | None`` -> ``Perturbation``.

    Raises ``ValueError`` with the accepted forms on anything else."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return Perturbation(None, seed=seed)
    text = str(spec).strip().lower()
    parts = text.split(":")
    kind = parts[0]
    usage = "expected jpeg:Q (1-100), noise:SIGMA (0-255 units), blur:K[:SIGMA] (odd K) or none"
    if kind not in KINDS or len(parts) < 2 or (kind != "blur" and len(parts) != 2) or len(parts) > 3:
        raise ValueError(f"bad perturbation {spec!r}: {usage}")
    try:
        value = float(parts[1])
        sigma = float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise ValueError(f"bad perturbation {spec!r}: {usage}") from None
    if kind == "jpeg":
        if value != int(value) or not 1 <= value <= 100:
            raise ValueError(f"bad perturbation {spec!r}: JPEG quality must be an integer in 1..100")
        return Perturbation("jpeg", value, seed=seed)
    if kind == "noise":
        if not value >= 0 or not np.isfinite(value):
            raise ValueError(f"bad perturbation {spec!r}: noise sigma must be >= 0 (0-255 units)")
        return Perturbation("noise", value, seed=seed)
    if value != int(value) or value < 1 or int(value) % 2 == 0:
        raise ValueError(f"bad perturbation {spec!r}: blur kernel size must be an odd positive integer")
    if sigma < 0:
        raise ValueError(f"bad perturbation {spec!r}: blur sigma must be >= 0")
    return Perturbation("blur", value, sigma=sigma, seed=seed)
