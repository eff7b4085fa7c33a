"""`legion report RUN_DIR...`: one page a person can look at, for any run, from its saved outputs.

    legion report runs/legion_7b_loc_exp runs/infer_7b runs/eval --gt data/SynthScars --output-dir runs/report

Each RUN_DIR (searched three levels deep) may hold:

- a training run (`log.jsonl`): the loss curves, and validation gIoU/cIoU/loss over the steps;
- inference outputs (`predictions.jsonl` next to `infer_config.yaml`; the image folder from
  `legion.eval.ground_truth.prediction_image_root`): a gallery of
  images with the predicted masks, the explanation with each grounded phrase in its mask's colour, the
  verdict; with `--gt` (a SynthScars-layout root) the ground truth next to it, drawn as the paper did;
- evaluation results (`metrics.json` of `legion eval` / `legion cls-eval`): tables shaped like the paper's.

Writes OUTPUT_DIR/report.html (self-contained folder: images in report_assets/) and report.md. The demo
builds its report with the same code (`build_report`). Nothing is recomputed from a model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from legion.errors import InputNotFoundError, OptionError

LOSS_KEYS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss")
VALIDATION_SCORE_KEYS = ("val_giou", "val_ciou")
VALIDATION_LOSS_KEYS = ("val_loss", "val_ce_loss", "val_mask_loss")
SKIP_DIRS = {"report_assets", "checkpoints", "encoder_cache", "vision_tower", "final_model", "cache"}


@dataclass
class RunParts:
    """What was found under the given folders."""

    training_logs: list[Path] = field(default_factory=list)
    predictions: list[Path] = field(default_factory=list)
    metrics: list[Path] = field(default_factory=list)


def find_parts(folders: Sequence[str | os.PathLike], depth: int = 3) -> RunParts:
    parts = RunParts()

    def visit(folder: Path, level: int) -> None:
        if (folder / "log.jsonl").is_file():
            parts.training_logs.append(folder / "log.jsonl")
        if (folder / "predictions.jsonl").is_file() and (folder / "infer_config.yaml").is_file():
            parts.predictions.append(folder / "predictions.jsonl")  # `legion infer` output (not cls-eval scores)
        if (folder / "metrics.json").is_file() and _is_evaluation(folder / "metrics.json"):
            parts.metrics.append(folder / "metrics.json")
        if level < depth:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS):
                visit(sub, level + 1)

    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputNotFoundError(f"run {folder}: no such folder")
        visit(folder, 0)
    for name in ("training_logs", "predictions", "metrics"):
        setattr(parts, name, list(dict.fromkeys(getattr(parts, name))))
    return parts


def _is_evaluation(path: Path) -> bool:
    """metrics.json of `legion eval` / `legion cls-eval` (not, e.g., cls-train's training summary)."""
    import json

    from legion.eval.report import normalise_metrics

    try:
        normalise_metrics(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError, TypeError):
        return False
    return True


# --- pieces -----------------------------------------------------------------------------------------
def training_figures(logs: Sequence[Path], assets: Path) -> tuple[list[tuple[str, Path]], list]:
    """(figures, tables): loss curves and validation curves per training log, last validation values."""
    from legion.gallery import Table, plot_curves
    from legion.utils.io import read_jsonl

    figures, rows = [], []
    for n, log in enumerate(logs):
        events = read_jsonl(log, skip_invalid=True)
        name = log.parent.name
        train = [e for e in events if e.get("event") == "train"]
        validation = [e for e in events if e.get("event") == "validation"]
        png = plot_curves(train, LOSS_KEYS, assets / f"{n:02d}_losses.png")
        if png:
            figures.append((f"Training losses: {name}", png))
        png = plot_curves(validation, VALIDATION_SCORE_KEYS, assets / f"{n:02d}_validation.png", "mask IoU", False)
        if png:
            figures.append((f"Validation mask gIoU / cIoU: {name}", png))
        png = plot_curves(validation, VALIDATION_LOSS_KEYS, assets / f"{n:02d}_validation_loss.png")
        if png:
            figures.append((f"Validation losses: {name}", png))
        if train or validation:
            last = validation[-1] if validation else {}
            rows.append(
                {
                    "run": name,
                    "steps": train[-1]["step"] if train else None,
                    "final loss": train[-1].get("loss") if train else None,
                    **{k: last.get(k) for k in (*VALIDATION_SCORE_KEYS, "val_loss") if k in last},
                }
            )
    tables = [Table("Training", rows, "Last logged step; validation on the held-out slice of train.")] if rows else []
    return figures, tables


def metric_tables(metrics: Sequence[Path]) -> list:
    """Tables shaped like the paper's from metrics.json files (legion.eval.report), one per kind."""
    from legion.eval.report import compare
    from legion.gallery import Table

    if not metrics:
        return []
    tables = []
    for table in compare(metrics, metrics=["miou", "f1"], allow_mixed_protocols=True):
        rows = [{"run": row["run"], **{c: row.get(c) for c in table.columns}} for row in table.rows]
        tables.append(Table(table.kind.capitalize(), rows, " ".join(table.notes)))
    return tables


def gallery_items(
    predictions: Path,
    limit: int,
    gt=None,
    gt_images: Path | None = None,
    image_dir: str | os.PathLike | None = None,
) -> list:
    """Up to `limit` GalleryItems of one predictions.jsonl: analysed images first, then the others. Ground
    truth (`gt`: name -> GroundTruthItem) is shown only when the predictions were made on `gt_images`, the
    ground truth's own image folder (other folders may reuse its file names)."""
    from legion.data.images import ImageReadError, read_image
    from legion.eval.ground_truth import prediction_image_root, read_predictions
    from legion.gallery import GalleryItem
    from legion.utils.rle import rle_to_mask

    root = Path(image_dir) if image_dir else prediction_image_root(predictions)
    if root is None:
        return []
    if gt_images is None or not root.is_dir() or root.resolve() != gt_images.resolve():
        gt = None
    records = read_predictions(predictions)
    records.sort(key=lambda r: (r.verdict != "fake", r.verdict != "real"))  # stable: listing order within
    items = []
    for record in records:
        if len(items) >= limit:
            break
        try:
            image = read_image(root / record.image)
        except (ImageReadError, OSError, ValueError):
            continue  # moved or unreadable: the gallery shows what it can
        height, width = image.shape[:2]
        masks = [rle_to_mask(m) for m in record.masks if tuple(m["size"]) == (height, width)]
        gt_mask = None
        item = gt.get(Path(record.image).name) if gt else None
        if item is not None:
            gt_mask = rle_to_mask(item.mask_rle((height, width)))
        items.append(GalleryItem(image, record, masks, gt_mask, f"{predictions.parent.name}: {record.image}"))
    return items


# --- the report -------------------------------------------------------------------------------------
def build_report(
    folders: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    gt: str | os.PathLike | None = None,
    split: str = "test",
    gallery_size: int = 12,  # per predictions file
    title: str = "LEGION report",
    intro: str = "",
    image_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """report.html + report.md in `output_dir` from everything found under `folders` (module docstring)."""
    from legion.gallery import write_report

    if gallery_size < 0:
        raise OptionError("--gallery must be >= 0")
    parts = find_parts(folders)
    if not (parts.training_logs or parts.predictions or parts.metrics):
        raise InputNotFoundError(
            f"no log.jsonl, predictions.jsonl or metrics.json under {', '.join(str(f) for f in folders)}"
        )
    out = Path(output_dir)
    assets = out / "report_assets"
    assets.mkdir(parents=True, exist_ok=True)
    figures, tables = training_figures(parts.training_logs, assets)
    tables += metric_tables(parts.metrics)
    ground_truth = None
    if gt is not None:
        from legion.eval.ground_truth import load_ground_truth

        ground_truth = load_ground_truth(gt, "synthscars", split=split)
    gt_images = Path(gt) / split / "images" if gt is not None else None
    items = []
    for predictions in parts.predictions:
        items += gallery_items(predictions, gallery_size, ground_truth, gt_images, image_dir)
    found = (
        f"{len(parts.training_logs)} training log(s), {len(parts.predictions)} prediction file(s), "
        f"{len(parts.metrics)} metrics file(s)"
    )
    return write_report(out, title, tables, items, figures=figures, intro=intro or f"Built from {found}.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from legion.cli_args import add_output_dir_argument

    parser.add_argument(
        "runs",
        nargs="+",
        help="run folders: training (log.jsonl), inference (predictions.jsonl), "
        "evaluation (metrics.json); searched three levels deep",
    )
    add_output_dir_argument(parser, help="where report.html, report.md and report_assets/ go (default: the first RUN)")
    parser.add_argument("--gt", default=None, help="SynthScars-layout root: show the ground truth next to predictions")
    parser.add_argument("--split", default="test", help="split of --gt (default test)")
    parser.add_argument("--images", default=None, help="image folder of the predictions (default: infer's image_dir)")
    parser.add_argument("--gallery", type=int, default=12, help="gallery images per predictions file (default 12)")
    parser.add_argument("--title", default="LEGION report", help="page title")


def run(args: argparse.Namespace) -> int:
    html_path, md_path = build_report(
        args.runs,
        args.output_dir or args.runs[0],
        gt=args.gt,
        split=args.split,
        gallery_size=args.gallery,
        title=args.title,
        image_dir=args.images,
    )
    print(f"wrote {html_path}\n      {md_path}")
    return 0
