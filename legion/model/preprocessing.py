"""CLIP and SAM preprocessing, and their normalisation constants (docs/model.md §4.2 and §7).

The model's own input contract, so it lives with the model: every image that reaches CLIP or SAM
(training data, inference, the detector, the controller's CLIP scorer) goes through these
functions and constants, defined here once. Inputs are RGB uint8 [H, W, 3] arrays from
`legion.data.images.read_image`; nothing here converts colour order.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN = (123.675, 116.28, 103.53)  # 0-255 space
SAM_STD = (58.395, 57.12, 57.375)


def _check_rgb(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = getattr(image, "dtype", type(image).__name__), getattr(image, "shape", None)
        raise ValueError(f"expected an RGB uint8 array [H, W, 3], got {got}")


def clip_resize_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to `size`; the long side is int(size * long / short)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def clip_preprocess(
    image: np.ndarray, size: int = 336, mean=CLIP_MEAN, std=CLIP_STD, crop_size: int | None = None
) -> torch.Tensor:
    """CLIPImageProcessor-equivalent: short side -> `size` (bicubic), centre crop, /255, normalize.

    image: uint8 [H, W, 3] RGB.  Returns float32 [3, crop, crop] (crop = crop_size or size).
    """
    _check_rgb(image)
    crop = crop_size or size
    new_h, new_w = clip_resize_size(image.shape[0], image.shape[1], size)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    # The crop box may stick out when the resized image is smaller than the crop: pad with zeros.
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if top >= 0 and left >= 0:
        cropped = resized[top : top + crop, left : left + crop]
    else:
        cropped = np.zeros((crop, crop, 3), dtype=np.uint8)
        src_top, src_left = max(top, 0), max(left, 0)
        dst_top, dst_left = max(-top, 0), max(-left, 0)
        h, w = min(crop, new_h - src_top), min(crop, new_w - src_left)
        cropped[dst_top : dst_top + h, dst_left : dst_left + w] = resized[
            src_top : src_top + h, src_left : src_left + w
        ]
    pixels = torch.from_numpy(np.array(cropped)).permute(2, 0, 1).float().div_(255.0)
    pixels.sub_(torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
    return pixels.div_(torch.tensor(std, dtype=torch.float32).view(3, 1, 1))


def resize_longest_side_size(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide target (h, w): scale = S / max(H, W), each side int(x * scale + 0.5)."""
    scale = longest_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_preprocess(
    image: np.ndarray, longest_side: int = 1024, pad_to: int = 1024, mean=SAM_MEAN, std=SAM_STD
) -> tuple[torch.Tensor, tuple[int, int]]:
    """ResizeLongestSide(S) (bilinear, PIL antialias), normalize in 0-255 space, zero-pad bottom/right.

    image: uint8 [H, W, 3] RGB.  Returns (float32 [3, pad_to, pad_to], (h, w) after resizing).
    `pad_to` is the SAM encoder's input size (1024 for ViT-H), independent of `longest_side`.
    """
    _check_rgb(image)
    if longest_side > pad_to:
        raise ValueError(f"longest_side {longest_side} does not fit the SAM input size pad_to={pad_to}")
    new_h, new_w = resize_longest_side_size(image.shape[0], image.shape[1], longest_side)
    if (new_h, new_w) == image.shape[:2]:
        resized = image
    else:
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    # In place on the padded buffer (no temporaries): same arithmetic as (x - mean) / std.
    out = torch.zeros(3, pad_to, pad_to, dtype=torch.float32)
    window = out[:, :new_h, :new_w]
    window.copy_(torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    window.sub_(torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
    window.div_(torch.tensor(std, dtype=torch.float32).view(3, 1, 1))
    return out, (new_h, new_w)
