"""Diffusers pipelines built in-process from tiny random configs (no downloads), mask dilation and
one inpainting step."""

import numpy as np
import pytest

from legion.config import ConfigError
from legion.controller.inpaint import InpainterConfig, dilate_mask, inpaint_image
from legion.controller.pipelines import PipelineLoadError, generate, load_pipeline, save_tiny_pipeline


def test_generation_is_seeded_and_follows_the_prompt(text2img):
    a = generate(text2img, "a cat", seed=42, steps=2, guidance=7.0)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, generate(text2img, "a cat", seed=42, steps=2, guidance=7.0))
    assert not np.array_equal(a, generate(text2img, "a dog", seed=42, steps=2, guidance=7.0))
    assert not np.array_equal(a, generate(text2img, "a cat", seed=7, steps=2, guidance=7.0))


def test_saved_pipeline_loads_from_its_directory(text2img, tmp_path):
    save_tiny_pipeline("text2img", tmp_path / "sd", seed=0)
    loaded = load_pipeline(tmp_path / "sd", "text2img")
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert np.array_equal(
        generate(loaded, "a cat", seed=1, steps=2, guidance=7.0),
        generate(text2img, "a cat", seed=1, steps=2, guidance=7.0),
    )
    with pytest.raises(PipelineLoadError, match="model_index.json"):
        load_pipeline(tmp_path / "nothing", "text2img")
    with pytest.raises(PipelineLoadError, match="cpu_offload needs a CUDA device"):
        load_pipeline(tmp_path / "sd", "text2img", device="cpu", cpu_offload=True)
    with pytest.raises(ValueError, match="unknown pipeline task"):
        load_pipeline(tmp_path / "sd", "video")


def test_dilation_grows_a_pixel_into_the_reference_square():
    mask = np.zeros((64, 64), np.uint8)
    mask[32, 32] = 1
    grown = dilate_mask(mask, kernel=5, iterations=5)  # reference: 5x5 kernel, 5 iterations -> radius 10
    ys, xs = np.nonzero(grown)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (22, 42, 22, 42) and grown.sum() == 21 * 21
    assert np.array_equal(dilate_mask(mask * 255, kernel=3, iterations=0), mask)
    with pytest.raises(ConfigError, match="kernel >= 1"):  # a ValueError, exit code 2 from the command line
        dilate_mask(mask, kernel=0)


def test_inpainting_restores_the_original_size_and_pastes_back(inpainter):
    image = np.random.RandomState(0).randint(0, 256, (40, 52, 3), dtype=np.uint8)
    mask = np.zeros((40, 52), np.uint8)
    mask[8:24, 10:30] = 1
    cfg = InpainterConfig(size=32, steps=2, strength=0.84, guidance=8.0, seed=42, paste_back=True)
    out = inpaint_image(inpainter, image, mask, "a cat", cfg)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[mask == 0], image[mask == 0])
    assert (out[mask == 1] != image[mask == 1]).mean() > 0.5
    assert np.array_equal(out, inpaint_image(inpainter, image, mask, "a cat", cfg))  # fixed seed
    # without paste-back the whole image goes through the VAE (as in the reference)
    raw = inpaint_image(inpainter, image, mask, "a cat", InpainterConfig(size=None, steps=2, paste_back=False))
    assert raw.shape == image.shape and not np.array_equal(raw[mask == 0], image[mask == 0])
