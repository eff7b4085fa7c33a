"""CLIP and SAM preprocessing against independent implementations (transformers' PIL CLIP processor,
segment_anything's ResizeLongestSide) and the spec's size table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from legion.model.preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    SAM_MEAN,
    SAM_STD,
    clip_preprocess,
    clip_resize_size,
    resize_longest_side_size,
    sam_preprocess,
)

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("hw", [(768, 1365), (300, 224), (97, 97), (337, 1000)])
def test_clip_preprocess_matches_hf_pil_processor(hw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = RNG.integers(0, 256, (*hw, 3), dtype=np.uint8)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        resample=3,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    expected = torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])
    ours = clip_preprocess(image, 336)
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_clip_resize_truncates_long_side():
    assert clip_resize_size(768, 1365, 336) == (336, 597)  # docs/model.md §4.2 example
    assert clip_resize_size(1365, 768, 336) == (597, 336)


@pytest.mark.parametrize(
    "hw, s1024, s512",
    [
        ((768, 1365), (576, 1024), (288, 512)),
        ((3000, 4000), (768, 1024), (384, 512)),
        ((224, 300), (765, 1024), (382, 512)),
        ((683, 1024), (683, 1024), (342, 512)),
        ((1365, 768), (1024, 576), (512, 288)),
    ],
)
def test_resize_longest_side_table(hw, s1024, s512):
    assert resize_longest_side_size(*hw, 1024) == s1024
    assert resize_longest_side_size(*hw, 512) == s512


@pytest.mark.parametrize("hw", [(77, 130), (130, 77), (64, 64), (300, 20)])
@pytest.mark.parametrize("longest", [64, 128])
def test_sam_preprocess_matches_segment_anything(hw, longest):
    from segment_anything.utils.transforms import ResizeLongestSide

    image = RNG.integers(0, 256, (*hw, 3), dtype=np.uint8)
    resized = torch.as_tensor(ResizeLongestSide(longest).apply_image(image)).permute(2, 0, 1).float()
    normalized = (resized - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    pad_to = 128
    expected = torch.nn.functional.pad(normalized, (0, pad_to - resized.shape[2], 0, pad_to - resized.shape[1]))
    ours, size = sam_preprocess(image, longest, pad_to)
    assert size == tuple(resized.shape[1:]) == resize_longest_side_size(*hw, longest)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert (ours[:, size[0] :, :] == 0).all() and (ours[:, :, size[1] :] == 0).all()


def test_sam_rejects_longest_side_bigger_than_pad():
    with pytest.raises(ValueError, match="pad_to"):
        sam_preprocess(np.zeros((8, 8, 3), np.uint8), 64, 32)


def test_inputs_must_be_rgb_uint8():
    with pytest.raises(ValueError, match="RGB uint8"):
        clip_preprocess(np.zeros((8, 8, 3), np.float32), 8)
    with pytest.raises(ValueError, match="RGB uint8"):
        sam_preprocess(np.zeros((8, 8), np.uint8), 8, 8)
