"""Scorers (tiny random CLIP through the real transformers code path; HPS error paths) and growth rates."""

import importlib.util
import json

import numpy as np
import pytest

from legion.controller.scoring import (
    ClipScorer,
    HPSv21Scorer,
    ScorerConfig,
    ScorerLoadError,
    build_scorer,
    clip_pixel_values,
    growth_rates,
)


def _images(n, shape=(40, 52, 3)):
    return [np.random.RandomState(i).randint(0, 256, shape, dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_clip():
    return ClipScorer.tiny(seed=0)


def test_clip_scorer_is_a_cosine_and_pairs_images_with_prompts(tiny_clip):
    images = _images(3)
    prompts = ["a cat on a sofa", "a red car in the rain at night", "x"]
    scores = tiny_clip.score(images, prompts)
    assert len(scores) == 3 and all(-1.0 <= s <= 1.0 for s in scores)
    # batching must not change a pair's score, and the order of pairs is kept
    single = [tiny_clip(im, p) for im, p in zip(images, prompts)]
    assert scores == pytest.approx(single, abs=1e-5)
    assert tiny_clip.score(images[::-1], prompts[::-1]) == pytest.approx(scores[::-1], abs=1e-5)
    # the text matters
    assert tiny_clip(images[0], prompts[0]) != pytest.approx(tiny_clip(images[0], prompts[1]), abs=1e-6)


def test_clip_scorer_rejects_bad_input(tiny_clip):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        tiny_clip.score(_images(2), ["a"])
    with pytest.raises(ValueError, match="uint8 RGB"):
        tiny_clip.score([np.zeros((8, 8), np.uint8)], ["a"])


def test_clip_scorer_round_trips_through_a_local_directory(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path / "clip")
    loaded = build_scorer(ScorerConfig(kind="clip", model_dir=str(tmp_path / "clip")))
    images = _images(2)
    assert loaded.score(images, ["a", "b c"]) == pytest.approx(tiny_clip.score(images, ["a", "b c"]), abs=1e-5)
    with pytest.raises(ScorerLoadError, match="config.json"):
        ClipScorer.from_dir(tmp_path / "missing")


def test_clip_preprocessing_shapes_and_centre_crop():
    image = np.zeros((30, 60, 3), np.uint8)
    image[:, 15:45] = 255  # the centre square is white, the sides black
    x = clip_pixel_values([image], 16)
    assert x.shape == (1, 3, 16, 16)
    white = (1.0 - 0.48145466) / 0.26862954
    assert float(x[0, 0, :, 2:-2].min()) == pytest.approx(white, abs=0.05)  # inside: only the white centre
    assert float(x[0, 0].max()) == pytest.approx(white, abs=0.05)


def test_hps_errors_are_clear(tmp_path):
    with pytest.raises(ScorerLoadError, match="HPS_v2.1_compressed.pt"):
        build_scorer(ScorerConfig(kind="hps_v2.1", checkpoint=str(tmp_path / "nope.pt")))
    with pytest.raises(ScorerLoadError, match="model_dir"):
        build_scorer(ScorerConfig(kind="clip"))
    with pytest.raises(ValueError, match="unknown scorer kind"):
        build_scorer(ScorerConfig(kind="fid"))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_hps_without_open_clip_says_which_package(tmp_path):
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    checkpoint.write_bytes(b"not read before the package check")
    with pytest.raises(ScorerLoadError, match="open_clip_torch"):
        HPSv21Scorer(checkpoint)


def test_growth_rate_both_readings():
    # two images: +100 % and 0 % -> mean of ratios 50 %, but the means go 2 -> 2.5 = 25 %
    rates = growth_rates([1.0, 3.0], [2.0, 3.0])
    assert rates["mean_of_ratios"] == pytest.approx(0.5)
    assert rates["ratio_of_means"] == pytest.approx(0.25)
    assert rates["pre_mean"] == pytest.approx(2.0) and rates["post_mean"] == pytest.approx(2.5)
    # the paper's regeneration means: the ratio of means is 6.79 %, not the reported 6.98 % (metrics.md §7)
    assert growth_rates([31.24], [33.36])["ratio_of_means"] == pytest.approx(0.0679, abs=5e-5)
    # a zero pre score cannot form a ratio: skipped and counted
    skipped = growth_rates([0.0, 2.0], [1.0, 3.0])
    assert skipped["mean_of_ratios"] == pytest.approx(0.5) and skipped["n_skipped_zero_pre"] == 1
    assert growth_rates([], [])["mean_of_ratios"] is None
    with pytest.raises(ValueError):
        growth_rates([1.0], [])


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="optional open_clip_torch not installed")
def test_hps_loader_with_a_tiny_open_clip_architecture(tmp_path):
    """The HPS v2.1 code path (open_clip model + checkpoint state_dict with `module.` prefixes) on a
    tiny registered architecture: the scores must be those of the checkpoint's weights."""
    import open_clip
    import torch

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "legion-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "legion-test-tiny-clip.json")
    torch.manual_seed(123)
    source, _, preprocess = open_clip.create_model_and_transforms("legion-test-tiny-clip", pretrained=None)
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, checkpoint)

    scorer = build_scorer(ScorerConfig(kind="hps_v2.1", checkpoint=str(checkpoint), clip_arch="legion-test-tiny-clip"))
    images, prompts = _images(2), ["a cat", "a bridge at dusk"]
    from PIL import Image

    tokenizer = open_clip.get_tokenizer("legion-test-tiny-clip")
    with torch.no_grad():
        image_emb = source.eval().encode_image(
            torch.stack([preprocess(Image.fromarray(im)) for im in images]), normalize=True
        )
        text_emb = source.encode_text(tokenizer(prompts), normalize=True)
    expected = (image_emb * text_emb).sum(-1).tolist()
    assert scorer.score(images, prompts) == pytest.approx(expected, abs=1e-5)

    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, tmp_path / "wrong_shape.pt")
    with pytest.raises(ScorerLoadError, match="does not fit"):
        HPSv21Scorer(tmp_path / "wrong_shape.pt", clip_arch="legion-test-tiny-clip")
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("transformer.")}
    torch.save({"state_dict": partial}, tmp_path / "partial.pt")
    with pytest.raises(ScorerLoadError, match="missing keys"):
        HPSv21Scorer(tmp_path / "partial.pt", clip_arch="legion-test-tiny-clip")
