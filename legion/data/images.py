"""The one image reader of the project: file -> RGB uint8 array [H, W, 3] of the *stored* pixels.

EXIF policy: the EXIF orientation tag is ignored everywhere (raw stored pixels). Annotation
polygons live in the stored pixel frame (the reference measured (H, W) with PIL, which does not
rotate), so image and masks always share one frame (docs/data_formats.md §6).

Conversions (counted through `ReadResult.conversion`): grayscale / bilevel / palette -> RGB
(replicated channels / palette lookup), CMYK -> RGB (Pillow's conversion), RGBA / LA -> RGB by
dropping alpha (what `cv2.imread(IMREAD_COLOR)` does, so pixels match the reference), 16-bit ->
8-bit by keeping the high byte (Pillow for 16-bit RGB, cv2 for every 16-bit image). Everything else raises
`ImageReadError` with a short machine-readable `reason`, so callers can skip and count instead of dying:

    missing, not_a_file, corrupt, truncated, decompression_bomb, unsupported_mode, empty
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from legion.errors import LegionError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# 8192 x 8192: SynthScars' largest images are ~4.1k px wide; anything this big is suspicious.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageReadError(LegionError):
    """An image that cannot be used. `reason` is one of the short codes in the module docstring."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class ReadResult:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    source_mode: str  # Pillow mode of the stored image, e.g. "RGB", "CMYK", "I;16"
    conversion: str | None  # None when the stored pixels were already 8-bit RGB


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def pil_to_rgb(img: Image.Image) -> tuple[np.ndarray, str | None]:
    """(RGB uint8 [H, W, 3], the conversion applied or None) for any mode we read; ValueError for others."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8), None
    if mode in ("L", "1"):
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), "gray->rgb"
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(img.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy(), "drop_alpha"
    if mode in ("LA", "La"):
        gray = np.asarray(img.convert("LA"), dtype=np.uint8)[:, :, 0]
        return np.repeat(gray[:, :, None], 3, axis=2), "drop_alpha+gray->rgb"
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy(), "palette->rgb"
    if mode == "CMYK":
        return np.asarray(img.convert("RGB"), dtype=np.uint8), "cmyk->rgb"
    if mode == "YCbCr":
        return np.asarray(img.convert("RGB"), dtype=np.uint8), "ycbcr->rgb"
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ValueError(f"integer pixel values outside 0..65535 in mode {mode}")
        sixteen_bit = mode.startswith("I;16") or values.max(initial=0) > 255
        # high byte, as Pillow does for 16-bit RGB and cv2.imread(IMREAD_COLOR) for any 16-bit image
        gray = (values >> 8 if sixteen_bit else values).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), "gray16->rgb" if sixteen_bit else "gray32->rgb"
    raise ValueError(f"unsupported pixel mode {mode!r}")


def read_image_info(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ReadResult:
    """Read `path` and return the RGB pixels with what was converted. Raises `ImageReadError`."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "missing")
    if not path.is_file():
        raise ImageReadError(path, "not_a_file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped Pillow's global; we never accept partial images
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images may pass unnoticed", stacklevel=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise ImageReadError(path, "empty", f"size {width}x{height}")
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageReadError(path, "decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
                # Pillow hands out 16-bit colour images as 8-bit RGB (high byte); count that too
                sixteen_bit_colour = img.mode == "RGB" and any(
                    "16" in str(tile[3]) for tile in (getattr(img, "tile", None) or []) if len(tile) > 3
                )
                img.load()
                try:
                    array, conversion = pil_to_rgb(img)
                    if sixteen_bit_colour and conversion is None:
                        conversion = "rgb16->rgb"
                except ValueError as err:
                    raise ImageReadError(path, "unsupported_mode", str(err)) from None
                source_mode = img.mode
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(path, "decompression_bomb", str(err)) from None
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "corrupt", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err)
        reason = "truncated" if ("truncated" in text or isinstance(err, EOFError)) else "corrupt"
        raise ImageReadError(path, reason, text) from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[:2] != (height, width):
        raise ImageReadError(path, "corrupt", f"decoded shape {array.shape} for stored size {width}x{height}")
    return ReadResult(np.ascontiguousarray(array), source_mode, conversion)


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 [H, W, 3] of the stored pixels (EXIF orientation ignored). Raises `ImageReadError`."""
    return read_image_info(path, max_pixels).image


def read_image_size(path: str | os.PathLike, check_end: bool = False) -> tuple[int, int]:
    """(H, W) of the stored image from its header only (no decode). Raises `ImageReadError`.

    check_end: also read the file's last bytes and raise ImageReadError(reason "truncated") when they are not
    what a complete file of its format ends with (`file_end_problem`): a file cut after its header passes
    the header read but is caught here, still without decoding."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "missing" if not path.exists() else "not_a_file")
    try:
        with Image.open(path) as img:
            width, height = img.size
            image_format = img.format
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "corrupt", str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, "corrupt", str(err)) from None
    if check_end:
        problem = file_end_problem(path, image_format)
        if problem is not None:
            raise ImageReadError(path, "truncated", problem)
    return height, width


def file_end_problem(path: str | os.PathLike, image_format: str | None) -> str | None:
    """Why the file does not end as a complete `image_format` file does, or None (also for formats without a
    cheap check, e.g. TIFF). JPEG: the EOI marker FFD9 (trailing padding allowed); PNG: the IEND chunk; GIF:
    the trailer 0x3B; WebP and BMP: the file is at least as long as its header says. A file cut after its
    header fails this; a file damaged in the middle needs a full decode (`read_image`)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
        fh.seek(max(0, size - 64))
        tail = fh.read()
    if image_format == "JPEG" and not tail.rstrip(b"\0\r\n\t ").endswith(b"\xff\xd9"):
        return "no JPEG end marker (FFD9)"
    if image_format == "PNG" and b"IEND\xaeB`\x82" not in tail:
        return "no PNG IEND chunk"
    if image_format == "GIF" and not tail.rstrip(b"\0").endswith(b";"):
        return "no GIF trailer"
    if image_format == "WEBP" and len(head) >= 8 and size < int.from_bytes(head[4:8], "little") + 8:
        return f"{size} bytes, the header says {int.from_bytes(head[4:8], 'little') + 8}"
    if image_format == "BMP" and len(head) >= 6 and size < int.from_bytes(head[2:6], "little"):
        return f"{size} bytes, the header says {int.from_bytes(head[2:6], 'little')}"
    return None
