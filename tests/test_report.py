"""`legion report RUN_DIR...`: the demo's report for any run, from the run's saved outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from legion.cli import main
from legion.infer import Analyzer, AnalyzerConfig, InferConfig, run_inference
from legion.train.logging import TrainLogger
from tests.browser import open_page


def _training_run(folder: Path) -> Path:
    """A log.jsonl written by the trainer's own logger: 6 steps, validation at steps 3 and 6."""
    log = TrainLogger(folder, progress=False)
    for step in range(1, 7):
        log.train_step(step, {"loss": 3.0 / step, "ce_loss": 2.0 / step, "mask_bce_loss": 0.5 / step, "lr": 1e-4})
        if step % 3 == 0:
            log.event("validation", step, {"val_loss": 2.5 / step, "val_giou": 0.1 * step, "val_ciou": 0.09 * step})
    log.close()
    return folder


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """(root, predictions dir): `legion infer` on ToyScars test images, then `legion eval localization`."""
    root = tmp_path_factory.mktemp("report_run")
    analyzer = Analyzer.from_config(
        AnalyzerConfig(
            model_path=str(tiny_model_dir), device="cpu", dtype="float32", max_new_tokens=24, sam_input_size=None
        )
    )
    cfg = InferConfig(image_dir=str(toy_data_dir / "test" / "images"), output_dir=str(root / "infer"), progress=False)
    run_inference(cfg, analyzer)
    code = main(
        [
            "eval",
            "localization",
            "--pred",
            str(root / "infer" / "predictions.jsonl"),
            "--gt",
            str(toy_data_dir),
            "--dataset",
            "synthscars",
            "--output-dir",
            str(root / "eval"),
            "--no-plots",
        ]
    )
    assert code == 0
    return root


def test_report_of_a_training_run_has_curves_and_last_validation(tmp_path, capsys):
    run = _training_run(tmp_path / "train")
    assert main(["report", str(run), "--output-dir", str(tmp_path / "report")]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Training losses: train" in page and "Validation mask gIoU / cIoU: train" in page
    assert sorted(p.name for p in (tmp_path / "report" / "report_assets").glob("*.png")) == [
        "00_losses.png",
        "00_validation.png",
        "00_validation_loss.png",
    ]
    markdown = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| train |"))
    assert "| 6 |" in row and "0.6" in row  # last step, last val_giou


def test_report_of_inference_and_eval_shows_tables_and_ground_truth(evaluated_run, toy_data_dir, tmp_path):
    out = tmp_path / "report"
    assert (
        main(["report", str(evaluated_run), "--gt", str(toy_data_dir), "--gallery", "4", "--output-dir", str(out)]) == 0
    )
    metrics = json.loads((evaluated_run / "eval" / "metrics.json").read_text())
    miou = f"{metrics['overall']['miou']:.2f}"
    markdown = (out / "report.md").read_text()
    assert "Localization" in markdown and miou in markdown
    ground_truth_panels = sorted((out / "report_assets").glob("*_gt.png"))
    assert len(ground_truth_panels) == 4  # four gallery images, each with its ground truth

    seen = open_page(out / "report.html")
    assert seen["errors"] == [] and seen["broken"] == [], seen
    assert len(seen["images"]) >= 12  # input, prediction and ground truth per gallery row


def test_ground_truth_is_not_shown_for_predictions_on_another_folder(evaluated_run, toy_data_dir, tmp_path):
    """Same file names in another folder are other images: no ground truth next to them."""
    other = tmp_path / "elsewhere"
    shutil.copytree(toy_data_dir / "test" / "images", other)
    out = tmp_path / "report"
    code = main(
        [
            "report",
            str(evaluated_run / "infer"),
            "--gt",
            str(toy_data_dir),
            "--images",
            str(other),
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    assert list((out / "report_assets").glob("*_gt.png")) == []
    assert list((out / "report_assets").glob("*.png"))  # the gallery itself is there


def test_report_gallery_size_is_checked(tmp_path, capsys):
    run = _training_run(tmp_path / "train")
    assert main(["report", str(run), "--gallery", "-1"]) == 2
    assert "--gallery must be >= 0" in capsys.readouterr().err
