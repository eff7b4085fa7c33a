"""Detector recipes: feature cache, head training (legion cls-train) and evaluation (legion cls-eval)."""

import json
import os

import pytest
import torch

from legion.cli import main as legion_main
from legion.config import load_config
from legion.data.detection import list_detection_images
from legion.eval.detector_run import DetectorEvalConfig, evaluate_detector
from legion.model.detector import build_detector, load_detector
from legion.train.detector import (
    DetectorTrainConfig,
    FeatureCache,
    evaluate_head,
    extract_features,
    reference_targets,
    stratified_split,
    train_detector,
    train_head,
)
from tests.test_detector_data import make_detection_tree
from tests.test_detector_model import make_clip_dir


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny heads on a loaded 2-core machine: thread hand-offs cost more than the matmuls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    clip = make_clip_dir(root / "clip")
    make_detection_tree(root / "train", {"toy": None}, n=40, seed=1)
    make_detection_tree(root / "test", {"a": None, "b": ["x", "y"]}, n=6, seed=50)
    return root, clip


def test_feature_cache_equals_fresh_features_and_tracks_mtime(setup, tmp_path):
    root, clip = setup
    det = build_detector(clip)
    items = list_detection_images(root / "test")
    fresh = extract_features(det, items, None, batch_size=5, progress=False)
    assert fresh.computed == len(items) and fresh.features.shape == (len(items), 32)

    cache_dir = tmp_path / "cache"
    first = extract_features(det, items, FeatureCache(cache_dir, shard_size=10), batch_size=5, progress=False)
    assert torch.equal(first.features, fresh.features)
    # a new cache object reads the shards from disk: nothing is recomputed, features are identical
    second = extract_features(det, items, FeatureCache(cache_dir), batch_size=5, progress=False)
    assert second.computed == 0 and torch.equal(second.features, fresh.features)
    # a touched file (new mtime) is recomputed, the others come from the cache
    st = os.stat(items[3].path)
    os.utime(items[3].path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    third = extract_features(det, items, FeatureCache(cache_dir), batch_size=5, progress=False)
    assert third.computed == 1 and torch.allclose(third.features, fresh.features, atol=1e-5)  # batch of 1
    # a different preprocessing signature (e.g. a perturbation) never reuses entries
    other = extract_features(
        det,
        items[:2],
        FeatureCache(cache_dir),
        transform_signature="blur:5",
        image_transform=lambda im: im[:, ::-1].copy(),
        progress=False,
    )
    assert other.computed == 2


def test_unreadable_images_are_skipped_and_counted(setup, tmp_path):
    root, clip = setup
    det = build_detector(clip)
    items = list_detection_images(root / "test")[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = items + [type(items[0])(str(broken), True, "a")]
    fs = extract_features(det, items, progress=False)
    assert len(fs.items) == 3 and fs.unreadable == [(str(broken), "corrupt")]


def test_stratified_split_keeps_every_group():
    from legion.data.detection import DetectionItem

    items = [DetectionItem(f"{s}{i}{f}", f, s) for s in "ab" for i in range(10) for f in (False, True)]
    train, val = stratified_split(items, 0.2, seed=0)
    assert len(val) == 8 and len(train) == 32 and not set(train) & set(val)
    assert {(it.subset, it.is_fake) for it in val} == {("a", False), ("a", True), ("b", False), ("b", True)}
    assert stratified_split(items, 0.2, seed=0) == (train, val)


def test_head_training_improves_accuracy_and_keeps_best_epoch(setup):
    root, clip = setup
    det = build_detector(clip, seed=0)
    items = list_detection_images(root / "train")
    train_items, val_items = stratified_split(items, 0.25, seed=0)
    tr = extract_features(det, train_items, progress=False)
    va = extract_features(det, val_items, progress=False)
    ytr, yva = reference_targets(tr.items), reference_targets(va.items)
    before = evaluate_head(det, va.features, yva)["accuracy"]
    cfg = load_config(DetectorTrainConfig, None, ["epochs=40", "batch_size=16", "optim.lr=1e-2"])
    result = train_head(det, tr.features, ytr, cfg, va.features, yva)
    after = evaluate_head(det, va.features, yva)["accuracy"]
    best = max(h["val_accuracy"] for h in result["history"])
    assert after == pytest.approx(best) == pytest.approx(result["best_val_accuracy"])
    assert result["history"][result["best_epoch"] - 1]["val_accuracy"] == best
    assert after >= 0.85 and after > before + 0.2, (before, after)
    assert result["steps"] == 40 * ((len(tr.items) + 15) // 16)


def test_detector_train_and_eval_recipes(setup, tmp_path):
    root, clip = setup
    out = tmp_path / "run"
    cfg = load_config(
        DetectorTrainConfig,
        None,
        [
            f"data.train={root / 'train'}",
            f"model.backbone={clip}",
            f"output_dir={out}",
            "num_workers=0",
            "epochs=30",
            "batch_size=16",
            "optim.lr=1e-2",
            f"feature_cache_dir={tmp_path / 'cache'}",
        ],
    )
    summary = train_detector(cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "detector.json",
        "head.safetensors",
        "log.jsonl",
        "metrics.json",
        "run_info.json",
    ]
    assert summary["best_val_accuracy"] >= 0.85 and summary["n_train"] + summary["n_val"] == 80
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 30 and "done" in events
    det = load_detector(out)
    assert json.loads((out / "detector.json").read_text())["training"]["epoch"] == summary["best_epoch"]

    # the feature cache makes a rerun skip CLIP
    cfg.output_dir = str(tmp_path / "run2")
    cfg.epochs = 1
    train_detector(cfg, progress=False)
    feats = [
        json.loads(line) for line in (tmp_path / "run2" / "log.jsonl").read_text().splitlines() if '"features"' in line
    ]
    assert all(f["computed"] == 0 for f in feats) and sum(f["from_cache"] for f in feats) == 80

    ev = load_config(
        DetectorEvalConfig,
        None,
        [f"detector_path={out}", f"data.test={root / 'test'}", f"output_dir={tmp_path / 'eval'}", "num_workers=0"],
    )
    result = evaluate_detector(ev, progress=False)
    m = result["metrics"]
    assert set(m["per_subset"]) == {"a", "b"}
    for key in ("accuracy", "ap", "real_accuracy", "fake_accuracy"):
        assert key in m["per_subset"]["a"]
    for key in ("mean_accuracy", "mean_ap", "overall"):
        assert key in m
    assert m["mean_accuracy"] == pytest.approx(
        (m["per_subset"]["a"]["accuracy"] + m["per_subset"]["b"]["accuracy"]) / 2
    )
    preds = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 36 and {"image", "subset", "is_fake", "fake_prob"} <= set(preds[0])
    # the predictions file alone reproduces the metrics
    from legion.eval.detection import detection_metrics

    assert detection_metrics(preds)["mean_accuracy"] == pytest.approx(m["mean_accuracy"])
    # the predictions agree with the detector run directly on the images
    from legion.data.images import read_image

    direct = det.fake_probability_images([read_image(p["image"]) for p in preds[:4]])
    assert direct == pytest.approx([p["fake_prob"] for p in preds[:4]], abs=1e-5)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["n_images"] == 36 and saved["metrics"]["mean_accuracy"] == pytest.approx(m["mean_accuracy"])
    assert saved["perturbation"] is None

    # a perturbation changes the pixels (so the predictions) and is recorded
    ev.perturbation, ev.output_dir = "noise:40", str(tmp_path / "eval_noise")
    noisy = evaluate_detector(ev, progress=False)
    assert noisy["perturbation"]["kind"] == "noise" and noisy["perturbation"]["sigma_0_255"] == 40
    noisy_preds = [
        json.loads(line) for line in (tmp_path / "eval_noise" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["image"] for p in noisy_preds] == [p["image"] for p in preds]
    assert any(abs(a["fake_prob"] - b["fake_prob"]) > 1e-4 for a, b in zip(noisy_preds, preds))


def test_head_trains_in_bf16_by_default_as_the_reference(setup, tmp_path):
    from safetensors.torch import load_file

    root, clip = setup
    assert DetectorTrainConfig().model.head_dtype == "bfloat16"
    heads = {}
    for head_dtype in ("bfloat16", "float32"):
        out = tmp_path / head_dtype
        cfg = load_config(
            DetectorTrainConfig,
            None,
            [
                f"data.train={root / 'train'}",
                f"model.backbone={clip}",
                f"output_dir={out}",
                "num_workers=0",
                "epochs=3",
                "batch_size=16",
                "optim.lr=1e-2",
                f"model.head_dtype={head_dtype}",
            ],
        )
        train_detector(cfg, progress=False)
        heads[head_dtype] = load_file(str(out / "head.safetensors"))["prediction_head.0.weight"]
    bf16, fp32 = heads["bfloat16"], heads["float32"]
    assert bf16.dtype == fp32.dtype == torch.float32  # files are fp32 either way
    assert torch.equal(bf16, bf16.bfloat16().float())  # ... but the bf16-trained one holds bf16 values
    assert not torch.equal(fp32, fp32.bfloat16().float())
    with pytest.raises(Exception, match="head_dtype"):
        train_detector(
            load_config(
                DetectorTrainConfig,
                None,
                [
                    f"data.train={root / 'train'}",
                    f"model.backbone={clip}",
                    f"output_dir={tmp_path / 'x'}",
                    "model.head_dtype=float16",
                ],
            ),
            progress=False,
        )


def test_cli_errors_are_clear(setup, tmp_path, capsys):
    root, clip = setup
    assert legion_main(["cls-train", f"output_dir={tmp_path}", f"model.backbone={clip}"]) == 2
    assert "data.train is required" in capsys.readouterr().err
    assert legion_main(["cls-train", "epoch=3"]) == 2
    assert "epochs" in capsys.readouterr().err
    # a missing required key is a usage error that writes nothing (no run_info.json either)
    for argv, message in (
        ([f"data.test={root / 'test'}"], "detector_path is required"),
        ([f"detector_path={tmp_path}"], "data.test is required"),
    ):
        assert legion_main(["cls-eval", f"output_dir={tmp_path / 'u'}", *argv]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "u").exists()
    # a folder that is not a detector checkpoint: the detector fails to load (failed work, exit code 1)
    assert (
        legion_main(
            ["cls-eval", f"detector_path={tmp_path}", f"data.test={root / 'test'}", f"output_dir={tmp_path / 'e'}"]
        )
        == 1
    )
    assert "detector.json" in capsys.readouterr().err
