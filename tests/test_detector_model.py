"""Real/fake detector (legion.model.detector): head shapes, feature choice, label mapping, checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import CLIPVisionConfig, CLIPVisionModel

from legion.model.configuration import CLIP_L14_336, LegionConfig
from legion.model.detector import (
    FAKE_INDEX,
    HEAD_FILE,
    META_FILE,
    DetectorLoadError,
    RealFakeDetector,
    backbone_fingerprint,
    build_detector,
    load_detector,
    resolve_clip_dir,
)

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)


def make_clip_dir(path, seed=0, **overrides):
    """A random CLIPVisionModel saved as a HF directory (what a real CLIP dir looks like on disk)."""
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**{**TINY_VISION, **overrides})).save_pretrained(path)
    return path


def make_legion_dir(path, tower_name="vision_tower", seed=0):
    """A LEGION-style checkpoint dir whose config.json names its CLIP relative to itself."""
    path.mkdir(parents=True, exist_ok=True)
    make_clip_dir(path / tower_name, seed=seed)
    LegionConfig(
        mm_vision_tower=tower_name,
        vision_config=TINY_VISION,
        mm_hidden_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip_dir(tmp_path_factory.mktemp("clip") / "clip")


def test_head_shapes_and_param_count_at_full_size():
    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_L14_336))
        det = RealFakeDetector(tower)
    shapes = {f"prediction_head.{k}": tuple(v.shape) for k, v in det.prediction_head.state_dict().items()}
    assert shapes == {
        "prediction_head.0.weight": (2048, 1024),
        "prediction_head.0.bias": (2048,),
        "prediction_head.2.weight": (2, 2048),
        "prediction_head.2.bias": (2,),
    }
    trainable = sum(p.numel() for p in det.parameters() if p.requires_grad)
    assert trainable == 2_103_298  # docs/model.md §0: only the head trains
    assert det.preprocess_spec.crop_size == 336


def test_feature_is_penultimate_cls_without_post_layernorm(clip_dir):
    det = build_detector(clip_dir)
    tower = det.vision_tower
    pixels = torch.randn(2, 3, 32, 32)
    # independent computation: embeddings -> pre-LN -> all layers but the last, CLS token, no post-LN
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixels))
        for layer in tower.encoder.layers[:-1]:
            out = layer(h, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(det.features(pixels), h[:, 0], atol=1e-5)
    assert not torch.allclose(det.features(pixels), tower.post_layernorm(h[:, 0]), atol=1e-3)


def test_label_mapping_index0_is_fake(clip_dir):
    det = build_detector(clip_dir)
    with torch.no_grad():
        last = det.prediction_head[2]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([2.0, 0.0]))  # logit index 0 (fake) larger
    p = det.fake_probability(torch.randn(3, 3, 32, 32))
    assert FAKE_INDEX == 0
    assert torch.allclose(p, torch.full((3,), torch.sigmoid(torch.tensor(2.0)).item()), atol=1e-6)
    images = [np.full((40, 50, 3), 128, np.uint8), np.zeros((32, 32, 3), np.uint8)]
    assert det.fake_probability_images(images) == pytest.approx([p[0].item()] * 2, abs=1e-6)


def test_head_output_depends_only_on_clip_input(clip_dir):
    det = build_detector(clip_dir, seed=1)
    pixels = torch.randn(2, 3, 32, 32)
    a = det(pixels)
    b = det.head_logits(det.features(pixels))
    assert torch.equal(a, b)
    assert det.vision_tower.training is False
    det.train()
    assert det.vision_tower.training is False and det.prediction_head.training is True
    assert all(not p.requires_grad for p in det.vision_tower.parameters())


def test_build_from_legion_dir_resolves_relative_tower(tmp_path, monkeypatch):
    legion = make_legion_dir(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "ckpt" / "..")  # cwd is not the checkpoint dir
    assert resolve_clip_dir(legion).resolve() == (legion / "vision_tower").resolve()
    det = build_detector(legion)
    assert det.hidden_size == 32 and det.clip_dir and det.preprocess_spec.size == 32
    bad = make_legion_dir(tmp_path / "bad", tower_name="tower")
    shutil.rmtree(bad / "tower")
    with pytest.raises(DetectorLoadError, match="not a local directory"):
        build_detector(bad)
    with pytest.raises(DetectorLoadError, match="config.json"):
        build_detector(tmp_path)


def test_checkpoint_round_trip_without_clip_copy(tmp_path):
    clip_dir = make_clip_dir(tmp_path / "clip")
    det = build_detector(clip_dir, seed=3)
    out = det.save(tmp_path / "det")
    assert sorted(os.listdir(out)) == sorted([HEAD_FILE, META_FILE])
    with safe_open(str(out / HEAD_FILE), "pt") as f:
        assert sorted(f.keys()) == [
            "prediction_head.0.bias",
            "prediction_head.0.weight",
            "prediction_head.2.bias",
            "prediction_head.2.weight",
        ]
    head_params = sum(p.numel() for p in det.prediction_head.parameters())
    assert (out / HEAD_FILE).stat().st_size < 4 * head_params + 4096  # the head only, no CLIP tensors
    meta = json.loads((out / META_FILE).read_text())
    assert meta["labels"]["0"] == "fake" and meta["labels"]["1"] == "real"
    assert meta["feature"] == {"hidden_states_index": -2, "token": "cls", "post_layernorm": False}

    pixels = torch.randn(4, 3, 32, 32)
    again = load_detector(out)
    assert torch.equal(again(pixels), det(pixels))
    assert again.preprocess_spec == det.preprocess_spec

    # moved together: the relative path still works after the absolute one disappears
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(out, moved / "det")
    shutil.copytree(clip_dir, moved / "clip")
    meta["backbone"]["clip_dir_absolute"] = str(tmp_path / "gone")
    (moved / "det" / META_FILE).write_text(json.dumps(meta))
    assert torch.equal(load_detector(moved / "det")(pixels), det(pixels))


def test_load_refuses_a_different_backbone(tmp_path, clip_dir):
    out = build_detector(clip_dir).save(tmp_path / "det")
    other = make_clip_dir(tmp_path / "other", seed=7)
    with pytest.raises(DetectorLoadError, match="fingerprint"):
        load_detector(out, backbone=other)
    assert load_detector(out, backbone=other, check_backbone=False).hidden_size == 32
    wider = make_clip_dir(tmp_path / "wider", hidden_size=48, intermediate_size=96)
    with pytest.raises(DetectorLoadError):
        load_detector(out, backbone=wider, check_backbone=False)
    with pytest.raises(DetectorLoadError, match="detector.json"):
        load_detector(tmp_path)


def test_fingerprint_ignores_dtype(clip_dir):
    a = CLIPVisionModel.from_pretrained(str(clip_dir))
    b = CLIPVisionModel.from_pretrained(str(clip_dir), dtype=torch.bfloat16)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)


def test_missing_clip_weights_is_an_error(tmp_path, clip_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(clip_dir / "config.json", broken / "config.json")
    with pytest.raises(DetectorLoadError, match="no file named model.safetensors"):
        build_detector(broken)
