"""Tables and plots from metrics.json files, shaped like the paper's tables.

A *run* is what one model/setting produced: a ``metrics.json`` file, a directory holding one, or
a directory whose sub-directories hold one each (``run/synthscars/metrics.json``,
``run/loki/metrics.json``, ...). A table has one row per run and columns per dataset x metric:

    localization: "Object mIoU", "Object F1", ..., "SynthScars mIoU", "LOKI F1", "RichHF-18K mIoU"
    explanation:  "SynthScars ROUGE-L", "SynthScars CSS", "LOKI ROUGE-L", "LOKI CSS"
    detection:    "GANs", "Deepfakes", "CRN", "IMLE", "SITD", "SAN", "Diffusion", "Mean", "Mean (subsets)", "AP"

Paper rows (``legion.eval.paper_results``) use the same column names, so ``with_paper`` puts
them underneath for a side-by-side reading.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from legion.errors import DataError, InputNotFoundError, OptionError
from legion.eval.paper_results import DETECTION_COLUMNS, EXPLANATION_COLUMNS, LOCALIZATION_COLUMNS, paper_rows
from legion.utils.io import atomic_path, atomic_write_text

KINDS = ("localization", "explanation", "detection")
DATASET_COLUMN = {"synthscars": "SynthScars", "loki": "LOKI", "richhf": "RichHF-18K"}
CONTENT_TYPE_COLUMN = {"object": "Object", "animal": "Animal", "human": "Human", "scene": "Scene"}
METRIC_LABEL = {
    "miou": "mIoU",
    "f1": "F1",
    "fg_iou": "FG IoU",
    "fg_f1": "FG F1",
    "global_fg_iou": "gFG IoU",
    "global_fg_f1": "gFG F1",
    "giou": "gIoU",
    "ciou": "cIoU",
    "rouge_l": "ROUGE-L",
    "css": "CSS",
}
PAPER_LOCALIZATION_METRICS = ("miou", "f1")
ALL_LOCALIZATION_METRICS = ("miou", "f1", "fg_iou", "fg_f1", "global_fg_iou", "global_fg_f1", "giou", "ciou")


@dataclass
class Run:
    name: str
    metrics: list[dict]  # metrics.json contents, each with "kind" and "dataset"
    paths: list[str] = field(default_factory=list)


def infer_kind(metrics: dict) -> str:
    """A metrics.json's kind: its ``kind`` field, else guessed from its keys (older files)."""
    if metrics.get("kind") in KINDS:
        return metrics["kind"]
    if "per_subset" in metrics:
        return "detection"
    overall = metrics.get("overall", {})
    if "rouge_l" in overall:
        return "explanation"
    if "miou" in overall:
        return "localization"
    raise DataError("cannot tell which kind of metrics.json this is (no 'kind' field)")


def normalise_metrics(m: dict) -> dict:
    """A metrics.json as tables read it: ``kind`` set; ``legion cls-eval``'s file (detection
    metrics nested under ``metrics``, the perturbation in ``config``) unwrapped."""
    if "kind" not in m and isinstance(m.get("metrics"), dict) and "per_subset" in m["metrics"]:
        config = m.get("config") or {}
        perturbation = config.get("perturbation") if isinstance(config, dict) else None
        m = {
            "kind": "detection",
            "dataset": "detection",
            **m["metrics"],
            "perturbation": [perturbation] if perturbation else [],
            **{k: v for k, v in m.items() if k not in ("metrics",)},
        }
    m.setdefault("kind", infer_kind(m))
    return m


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """A run from a metrics.json file or a directory (searched two levels deep)."""
    path = Path(path)
    if path.is_file():
        files = [path]
        default_name = path.parent.name
    elif path.is_dir():
        files = sorted(
            p
            for p in [path / "metrics.json", *path.glob("*/metrics.json"), *path.glob("*/*/metrics.json")]
            if p.is_file()
        )
        default_name = path.name
    else:
        raise InputNotFoundError(f"run {path}: no such file or directory")
    if not files:
        raise InputNotFoundError(f"run {path}: no metrics.json in it or in its sub-directories")
    metrics = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            try:
                m = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{f}: not JSON ({exc})") from None
        metrics.append(normalise_metrics(m))
    return Run(name=name or default_name, metrics=metrics, paths=[str(f) for f in files])


def _column_for_dataset(dataset: str | None) -> str:
    return DATASET_COLUMN.get(str(dataset).lower(), str(dataset)) if dataset else "dataset"


def _row_entries(run: Run, kind: str, loc_metrics: Sequence[str]) -> dict[str, float | None]:
    row: dict[str, float | None] = {}

    def put(column: str, value):
        if column in row and row[column] != value:
            warnings.warn(f"run {run.name}: two metrics.json give {column!r}; keeping the later one", stacklevel=2)
        row[column] = value

    for m in run.metrics:
        if m["kind"] != kind:
            continue
        labels = [perturbation_label(p) for p in m.get("perturbation") or []]
        labels = [label for label in labels if label != "none"]
        if labels:
            row["perturbation"] = ", ".join(
                sorted(set(labels) | set(filter(None, str(row.get("perturbation") or "").split(", "))))
            )
        ds_col = _column_for_dataset(m.get("dataset"))
        if kind == "localization":
            groups = [(ds_col, m["overall"])]
            if str(m.get("dataset")).lower() == "synthscars":
                groups += [
                    (CONTENT_TYPE_COLUMN.get(str(label).lower(), str(label).title()), summary)
                    for label, summary in m.get("by_content_type", {}).items()
                ]
            for col, summary in groups:
                for key in loc_metrics:
                    put(f"{col} {METRIC_LABEL[key]}", summary.get(key))
        elif kind == "explanation":
            for key in ("rouge_l", "css"):
                put(f"{ds_col} {METRIC_LABEL[key]}", m["overall"].get(key))
        else:
            groups = m.get("groups", {})
            for col in DETECTION_COLUMNS:
                if col in groups:
                    put(col, groups[col]["accuracy"])
            if all(col in groups for col in DETECTION_COLUMNS):
                put("Mean", sum(groups[c]["accuracy"] for c in DETECTION_COLUMNS) / len(DETECTION_COLUMNS))
            put("Mean (subsets)", m.get("mean_accuracy"))
            put("AP", m.get("mean_ap"))
            put("Real acc", m.get("mean_real_accuracy"))
            put("Fake acc", m.get("mean_fake_accuracy"))
    return row


def perturbation_label(p) -> str:
    """Short label of a recorded perturbation (``legion.data.perturb.Perturbation.describe()``)."""
    if not isinstance(p, dict):
        return str(p)
    kind = p.get("kind")
    if kind is None:
        return "none"
    if kind == "jpeg":
        return f"jpeg:{p.get('quality')}"
    if kind == "noise":
        return f"noise:{p.get('sigma_0_255'):g}" if isinstance(p.get("sigma_0_255"), (int, float)) else "noise"
    if kind == "blur":
        sigma = p.get("sigma") or 0
        return f"blur:{p.get('kernel_size')}" + (f":{sigma:g}" if sigma else "")
    return str(kind)


def _ordered_columns(kind: str, present: Iterable[str], loc_metrics: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(present))
    head = [c for c in ("GT raster", "perturbation") if c in present]
    present = [c for c in present if c not in head]
    if kind == "localization":
        datasets = list(LOCALIZATION_COLUMNS[:4]) + ["SynthScars"] + list(LOCALIZATION_COLUMNS[4:])
        preferred = [f"{d} {METRIC_LABEL[k]}" for d in datasets for k in loc_metrics]
    elif kind == "explanation":
        preferred = [f"{d} {METRIC_LABEL[k]}" for d in EXPLANATION_COLUMNS for k in ("rouge_l", "css")]
    else:
        preferred = list(DETECTION_COLUMNS) + ["Mean", "Mean (subsets)", "AP", "Real acc", "Fake acc"]
    ordered = [c for c in preferred if c in present]
    return head + ordered + [c for c in present if c not in ordered]


@dataclass
class Table:
    kind: str
    columns: list[str]  # without the leading "run" column
    rows: list[dict]  # each: {"run": name, column: value | None}
    notes: list[str] = field(default_factory=list)

    def to_markdown(self, decimals: int = 2) -> str:
        header = ["run", *self.columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(self.columns)) + "|"]
        for row in self.rows:
            cells = [str(row["run"])] + [_fmt(row.get(c), decimals) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", *self.columns])
        for row in self.rows:
            writer.writerow([row["run"]] + [_csv_cell(row.get(c)) for c in self.columns])
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind, "columns": self.columns, "rows": self.rows, "notes": self.notes}, indent=2
        )

    def render(self, fmt: str) -> str:
        return {"md": self.to_markdown, "markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}[fmt]()


def _fmt(value, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    return f"{float(value):.{decimals}f}"


def _csv_cell(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else repr(float(value))


def gt_raster_of(metrics: dict) -> str:
    """The ground-truth rasterization a localization metrics.json was scored with. Files written
    before it was recorded used pycocotools for polygons ("coco") but the reference's boxes for LOKI."""
    recorded = (metrics.get("protocol") or {}).get("gt_raster")
    if recorded:
        return recorded
    return {"synthscars": "coco", "loki": "paper"}.get(str(metrics.get("dataset")).lower(), "pixels")


def _check_rasters(runs: Sequence[Run], allow_mixed: bool, with_paper: bool) -> tuple[dict[str, str], list[str]]:
    """{run name: raster label} and notes; raises when runs scored one dataset with different rasters."""
    per_dataset: dict[str, dict[str, str]] = {}
    labels: dict[str, set[str]] = {}
    for run in runs:
        for m in run.metrics:
            if m["kind"] != "localization":
                continue
            raster = gt_raster_of(m)
            per_dataset.setdefault(str(m.get("dataset")), {})[run.name] = raster
            labels.setdefault(run.name, set()).add(raster)
    notes = []
    mixed = {ds: by_run for ds, by_run in per_dataset.items() if len(set(by_run.values()) - {"pixels"}) > 1}
    if mixed:
        detail = "; ".join(f"{ds}: " + ", ".join(f"{r}={v}" for r, v in by_run.items()) for ds, by_run in mixed.items())
        if not allow_mixed:
            raise OptionError(
                f"runs were scored with different ground-truth rasterizations ({detail}); their numbers "
                "are not comparable. Re-score them with the same `legion eval localization --gt-raster`, "
                "or pass --allow-mixed-protocols to list them anyway"
            )
        notes.append(f"WARNING: mixed ground-truth rasterizations ({detail}); rows are not comparable")
    if with_paper:
        off = sorted(name for name, used in labels.items() if "coco" in used)
        if off:
            notes.append(
                "WARNING: " + ", ".join(off) + " scored with --gt-raster coco; the paper's rows used the "
                "paper's rasterizer (cv2.fillPoly on truncated vertices), which gives ~5-8% larger masks"
            )
    return {name: "+".join(sorted(used)) for name, used in labels.items()}, notes


def build_table(
    runs: Sequence[Run],
    kind: str,
    metrics: Sequence[str] | None = None,
    with_paper: bool = False,
    allow_mixed_protocols: bool = False,
) -> Table:
    """One row per run (runs without metrics of ``kind`` are left out). ``metrics`` picks the
    localization metrics shown (default the paper's mIoU and F1). Localization runs scored with
    different ground-truth rasterizations raise ValueError unless ``allow_mixed_protocols``."""
    if kind not in KINDS:
        raise OptionError(f"unknown table kind {kind!r}; choose one of {', '.join(KINDS)}")
    loc_metrics = tuple(metrics or PAPER_LOCALIZATION_METRICS)
    unknown = [k for k in loc_metrics if k not in ALL_LOCALIZATION_METRICS]
    if unknown:
        choices = ", ".join(ALL_LOCALIZATION_METRICS)
        raise OptionError(f"unknown localization metric(s) {unknown}; choose from {choices}")
    notes: list[str] = []
    rasters: dict[str, str] = {}
    if kind == "localization":
        rasters, notes = _check_rasters(runs, allow_mixed_protocols, with_paper)
    rows = []
    for run in runs:
        entries = _row_entries(run, kind, loc_metrics)
        if entries:
            if allow_mixed_protocols and run.name in rasters:
                entries = {"GT raster": rasters[run.name], **entries}
            rows.append({"run": run.name, **entries})
    if kind == "localization":
        protocols = {
            m["protocol"].get("fg_both_empty")
            for r in runs
            for m in r.metrics
            if m["kind"] == "localization" and "protocol" in m
        }
        if any(k not in PAPER_LOCALIZATION_METRICS for k in loc_metrics):
            notes.append("foreground metrics: both-empty convention " + ", ".join(sorted(map(str, protocols))))
    if kind == "explanation":
        models = {
            m["protocol"].get("css_model")
            for r in runs
            for m in r.metrics
            if m["kind"] == "explanation" and "protocol" in m
        }
        models.discard(None)
        if models:
            notes.append("CSS embedding model: " + "; ".join(sorted(models)) + " (the paper does not name its model)")
    if with_paper:
        paper = paper_rows(kind)
        if kind == "localization":
            paper = [{k: v for k, v in r.items() if k == "run" or k.endswith((" mIoU", " F1"))} for r in paper]
        rows += paper
        notes.append("paper rows: arXiv 2503.15264 v1 (Tables 2, 3, 5); detection 'Mean' over the 7 columns is derived")
        if kind == "detection":
            notes.append(
                "GANs / Diffusion membership is not stated by the paper; ours: see legion.eval.detection.TABLE5_COLUMNS"
            )
    present = [c for r in rows for c in r if c != "run"]
    return Table(kind=kind, columns=_ordered_columns(kind, present, loc_metrics), rows=rows, notes=notes)


def compare(
    paths: Sequence[str | os.PathLike],
    kind: str | None = None,
    metrics: Sequence[str] | None = None,
    with_paper: bool = False,
    allow_mixed_protocols: bool = False,
) -> list[Table]:
    """Side-by-side tables of several runs: one table per kind found (or only ``kind``)."""
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # disambiguate runs whose folders share a name
        if names.count(r.name) > 1:
            r.name = str(paths[i])
    kinds = [kind] if kind else [k for k in KINDS if any(m["kind"] == k for r in runs for m in r.metrics)]
    return [
        build_table(runs, k, metrics=metrics, with_paper=with_paper, allow_mixed_protocols=allow_mixed_protocols)
        for k in kinds
    ]


def write_tables(table: Table, out_dir: str | os.PathLike, stem: str = "table") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ext, fmt in (("md", "md"), ("csv", "csv"), ("json", "json")):
        path = out_dir / f"{stem}.{ext}"
        atomic_write_text(path, table.render(fmt))
        written.append(path)
    return written


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_category_bars(
    metrics: dict, out_png: str | os.PathLike, keys: Sequence[str] = ("miou", "f1", "fg_iou")
) -> Path | None:
    """Grouped bars: overall and every content type / artifact category, one bar per metric.
    Returns None (and writes nothing) for a metrics.json without numbers."""
    groups = [("overall", metrics.get("overall", {}))]
    groups += [(f"type: {k}", v) for k, v in metrics.get("by_content_type", {}).items()]
    groups += [(f"cat: {k}", v) for k, v in metrics.get("by_artifact_category", {}).items()]
    keys = [k for k in keys if any(g.get(k) is not None for _, g in groups)]
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) + 1), 3.6))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(groups))]
        values = [g.get(key) or 0.0 for _, g in groups]
        ax.bar(xs, values, width=width, label=METRIC_LABEL.get(key, key))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{name}\n(n={g.get('num_images', '?')})" for name, g in groups], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (0-100)")
    ax.set_title(f"{metrics.get('dataset') or ''} localization by category".strip())
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return out_png


def plot_iou_histogram(per_image_rows: Sequence[dict], out_png: str | os.PathLike, bins: int = 20) -> Path:
    """Histogram of per-image foreground IoU and LEGION mIoU (0-1)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, label in (("fg_iou", "foreground IoU"), ("miou", "mIoU (fg/bg)")):
        values = [r[key] for r in per_image_rows if r.get(key) is not None]
        if values:
            ax.hist(values, bins=bins, range=(0, 1), alpha=0.6, label=f"{label} (n={len(values)})")
    ax.set_xlabel("per-image value")
    ax.set_ylabel("images")
    ax.set_title("per-image IoU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return out_png
