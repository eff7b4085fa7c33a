"""The tiny detector separates ToyScars' real and fake images (issue 7's toy proof, smaller)."""

import json

import pytest

from legion.cli import main


@pytest.mark.slow
def test_tiny_detector_learns_toyscars(tmp_path, tiny_model_dir):
    toy = tmp_path / "toy"
    assert main(["make-toy-data", "--output-dir", str(toy)]) == 0  # the defaults: 400 train / 100 test pairs
    assert (
        main(
            [
                "cls-train",
                "--config",
                "configs/tiny/train_cls.yaml",
                f"data.train={toy}/detection/train",
                f"model.backbone={tiny_model_dir}",
                f"output_dir={tmp_path}/detector",
                f"feature_cache_dir={tmp_path}/features",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "cls-eval",
                "--config",
                "configs/tiny/eval_cls.yaml",
                f"detector_path={tmp_path}/detector",
                f"data.test={toy}/detection/test",
                f"output_dir={tmp_path}/eval",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics["per_subset"]) == {"toyscars"}
    assert metrics["mean_accuracy"] >= 85.0  # measured 94.0 (configs/tiny/train_cls.yaml)
