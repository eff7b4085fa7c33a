"""A report a person would rather look at than read: metric tables, a loss curve and a gallery of
images with mask overlays, explanations whose grounded phrases are highlighted in their mask's
colour, and the detector's verdict.

    write_report(out_dir, title, tables, gallery, loss_log=...)  ->  report.html + report.md

Images are written next to the report (``report_assets/``) and referenced relatively, so the page
renders offline and can be copied as one folder.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from legion.record import PredictionRecord
from legion.utils.io import atomic_path, atomic_write_png, atomic_write_text

# Distinct, colour-blind friendly colours (Okabe-Ito + extras), RGB.
PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (153, 153, 153),
    (255, 99, 71),
    (60, 179, 113),
]


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    """Blend one colour per mask into an RGB uint8 image [H, W, 3] and outline each mask."""
    out = image.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        m = np.asarray(mask).astype(bool)
        if m.shape != image.shape[:2]:
            raise ValueError(f"mask {i} has shape {m.shape}, image {image.shape[:2]}")
        if not m.any():
            continue
        c = np.array(colour(i), dtype=np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * c
        edge = m & ~_erode(m)
        out[edge] = c
    return out.clip(0, 255).astype(np.uint8)


def _erode(m: np.ndarray) -> np.ndarray:
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return inner


def highlight_phrases(explanation: str, phrases: Sequence[str]) -> str:
    """HTML of `explanation` with the i-th phrase (first occurrence after the previous one) coloured
    like the i-th mask. Phrases that are not found are listed after the text, still coloured."""
    parts, cursor, missing = [], 0, []
    for i, phrase in enumerate(phrases):
        at = explanation.find(phrase, cursor) if phrase else -1
        if at < 0:
            missing.append((i, phrase))
            continue
        parts.append(html.escape(explanation[cursor:at]))
        parts.append(_chip(i, phrase))
        cursor = at + len(phrase)
    parts.append(html.escape(explanation[cursor:]))
    if missing:
        parts.append("<br><small>also grounded: " + ", ".join(_chip(i, p) for i, p in missing) + "</small>")
    return "".join(parts)


def _chip(i: int, text: str) -> str:
    r, g, b = colour(i)
    return (
        f'<mark style="background: rgba({r},{g},{b},0.35); border-bottom: 3px solid rgb({r},{g},{b})">'
        f"{html.escape(text)}</mark>"
    )


@dataclass
class GalleryItem:
    """One image of the gallery: the picture, the prediction record and (optionally) the GT masks."""

    image: np.ndarray  # RGB uint8 [H, W, 3]
    record: PredictionRecord
    masks: list[np.ndarray] = field(default_factory=list)  # predicted, one per phrase
    gt_mask: np.ndarray | None = None  # union of the ground-truth masks
    title: str = ""


@dataclass
class Table:
    title: str
    rows: list[dict]
    note: str = ""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def _table_md(table: Table) -> str:
    if not table.rows:
        return f"### {table.title}\n\n(no rows)\n"
    cols = list(dict.fromkeys(k for row in table.rows for k in row))
    lines = [f"### {table.title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _table_html(table: Table) -> str:
    if not table.rows:
        return f"<h3>{html.escape(table.title)}</h3><p>(no rows)</p>"
    cols = list(dict.fromkeys(k for row in table.rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c)))}</td>" for c in cols) + "</tr>" for row in table.rows
    )
    note = f"<p class='note'>{html.escape(table.note)}</p>" if table.note else ""
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def plot_curves(
    rows: Sequence[dict],
    keys: Iterable[str],
    out_png: str | os.PathLike,
    ylabel: str = "loss",
    log_scale: bool = True,
) -> Path | None:
    """One line per key over `step` from log records (dicts with a `step` field); None when no key has values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    rows = [r for r in rows if "step" in r and any(r.get(k) is not None for k in keys)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), label=k, linewidth=1.4, marker="o" if len(pts) < 30 else None, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out_png


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-size: 0.9em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 18px; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 10px; }
.card img { width: 32.5%; image-rendering: pixelated; border-radius: 4px; }
.verdict { font-weight: 600; padding: 1px 8px; border-radius: 10px; color: white; }
.fake { background: #c0392b; } .real { background: #27ae60; } .error { background: #7f8c8d; }
.expl { font-size: 0.92em; line-height: 1.45; }
"""


def write_report(
    out_dir: str | os.PathLike,
    title: str,
    tables: Sequence[Table],
    gallery: Sequence[GalleryItem],
    figures: Sequence[tuple[str, str | os.PathLike]] = (),
    intro: str = "",
) -> tuple[Path, Path]:
    """Write `out_dir/report.html` and `out_dir/report.md`; returns both paths. `figures`: (heading, PNG)
    pairs, the PNGs inside `out_dir/report_assets/` (e.g. from `plot_curves`)."""
    out = Path(out_dir)
    assets = out / "report_assets"
    assets.mkdir(parents=True, exist_ok=True)
    figures = [(heading, Path(png).relative_to(out).as_posix()) for heading, png in figures]

    cards_html, cards_md = [], []
    for n, item in enumerate(gallery):
        stem = f"{n:03d}"
        atomic_write_png(assets / f"{stem}_input.png", item.image)
        atomic_write_png(assets / f"{stem}_pred.png", overlay_masks(item.image, item.masks))
        imgs = [f"report_assets/{stem}_input.png", f"report_assets/{stem}_pred.png"]
        if item.gt_mask is not None:
            atomic_write_png(assets / f"{stem}_gt.png", overlay_masks(item.image, [item.gt_mask]))
            imgs.append(f"report_assets/{stem}_gt.png")
        rec = item.record
        verdict = rec.verdict or "error"
        prob = rec.fake_prob
        prob_txt = f" P(fake) = {prob:.2f}" if isinstance(prob, (int, float)) else ""
        expl = rec.explanation or ""
        body = (
            highlight_phrases(expl, rec.phrases or [])
            if verdict == "fake"
            else html.escape(
                rec.error
                or ("no artifact analysis: the detector judged this image real" if verdict == "real" else expl)
            )
        )
        card_title = html.escape(item.title or rec.image or "")
        labels = ["input", "prediction", "ground truth"]
        pictures = "".join(
            f'<img src="{src}" alt="{labels[i]} {html.escape(item.title)}" title="{labels[i]}">'
            for i, src in enumerate(imgs)
        )
        cards_html.append(
            f'<div class="card"><div><b>{card_title}</b> '
            f'<span class="verdict {html.escape(verdict)}">{html.escape(verdict)}</span>{html.escape(prob_txt)}</div>'
            f'<div>{pictures}</div><p class="expl">{body}</p></div>'
        )
        cards_md.append(
            f"- **{item.title or rec.image or ''}** — {verdict}{prob_txt}: "
            f"{expl if verdict == 'fake' else ''} ![pred]({imgs[1]})"
        )

    tables_html = "".join(_table_html(t) for t in tables)
    curve_html = "".join(
        f'<h2>{html.escape(heading)}</h2><img src="{html.escape(src)}" alt="{html.escape(heading)}">'
        for heading, src in figures
    )
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(intro)}</p><h2>Metrics</h2>{tables_html}{curve_html}"
        f"<h2>Gallery</h2><p class='note'>Left: input. Middle: predicted masks, one colour per grounded "
        f"phrase (the phrase is highlighted in the same colour). Right, when present: ground truth."
        f"</p><div class='gallery'>{''.join(cards_html)}</div></body></html>"
    )
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, page)
    md = [f"# {title}", "", intro, "", "## Metrics", ""] + [_table_md(t) for t in tables]
    for heading, src in figures:
        md += [f"## {heading}", "", f"![{heading}]({src})", ""]
    md += ["## Gallery", ""] + cards_md
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return html_path, md_path
