"""Controller outputs: summary.jsonl (one line per case), scores.json (before/after and both growth
rates) and index.html (before/after side by side with LEGION's explanation).

The HTML page is self-contained: inline CSS, no scripts, images referenced by paths relative to
the output folder, so the folder can be copied or opened offline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from legion.controller.scoring import growth_rates
from legion.utils.io import atomic_write_jsonl, atomic_write_text

GROWTH_NOTE = (
    "mean_of_ratios = mean over images of (post - pre) / pre (probably the paper's 'growth rate'); "
    "ratio_of_means = (mean post - mean pre) / mean pre. 'post' is the best-scoring image of the loop "
    "(the original included), 'pre' the original; both are scored against the original prompt."
)


def case_summary(
    case_id: str,
    prompt: str,
    source_image: str | None,
    rounds: list[dict],
    best_round: int,
    stop_reason: str,
    scorer: str,
) -> dict:
    """One summary.jsonl line."""
    return {
        "case_id": case_id,
        "prompt": prompt,
        "source_image": source_image,
        "scorer": scorer,
        "pre_score": rounds[0]["score"],
        "post_score": rounds[best_round]["score"],
        "last_score": rounds[-1]["score"],
        "best_round": best_round,
        "num_rounds": len(rounds),
        "stop_reason": stop_reason,
        "final_prompt": rounds[best_round]["prompt"],
        "rounds": rounds,
    }


def aggregate_scores(summaries: Sequence[dict], scorer: str, command: str) -> dict:
    pre = [s["pre_score"] for s in summaries]
    post = [s["post_score"] for s in summaries]
    rates = growth_rates(pre, post)
    per_image = [
        {
            "case_id": s["case_id"],
            "pre": s["pre_score"],
            "post": s["post_score"],
            "gain": (s["post_score"] - s["pre_score"]) / abs(s["pre_score"]) if s["pre_score"] else None,
        }
        for s in summaries
    ]
    return {
        "command": command,
        "scorer": scorer,
        **rates,
        "note": GROWTH_NOTE,
        "per_image": per_image,
        "stop_reasons": {
            r: sum(s["stop_reason"] == r for s in summaries) for r in sorted({s["stop_reason"] for s in summaries})
        },
    }


def write_summary(out_dir: str | Path, summaries: Sequence[dict], scorer: str, command: str) -> dict:
    """Write summary.jsonl + scores.json; return the aggregate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "summary.jsonl", summaries)
    aggregate = aggregate_scores(summaries, scorer, command)
    atomic_write_text(out_dir / "scores.json", json.dumps(aggregate, indent=2))
    return aggregate


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_scores(aggregate: dict) -> str:
    """Plain-text score report for the terminal."""
    return (
        f"{aggregate['command']} ({aggregate['scorer']}, n={aggregate['n']}): "
        f"pre {_num(aggregate['pre_mean'])} -> post {_num(aggregate['post_mean'])}; growth rate "
        f"{_pct(aggregate['mean_of_ratios'])} (mean of per-image ratios), "
        f"{_pct(aggregate['ratio_of_means'])} (ratio of means)"
    )


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.case { border-collapse: collapse; margin-bottom: 2em; }
table.case td { vertical-align: top; padding: 6px; border: 1px solid #ccc; }
img { max-width: 320px; max-height: 320px; image-rendering: pixelated; min-width: 128px; }
.score { font-weight: bold; } .muted { color: #777; font-size: 90%; }
"""


def write_html(out_dir: str | Path, summaries: Sequence[dict], aggregate: dict, title: str) -> Path:
    """index.html: per case, first image | its LEGION mask | best image, with prompts and explanations."""
    out_dir = Path(out_dir)
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
        f"<p>{esc(format_scores(aggregate))}</p><p class='muted'>{esc(GROWTH_NOTE)}</p>",
    ]
    for s in summaries:
        first, best = s["rounds"][0], s["rounds"][s["best_round"]]
        history = "".join(
            f"<li>round {r['round']}: score {_num(r['score'])}, verdict {esc(str(r['verdict']))}, "
            f"{esc(r['prompt'])}</li>"
            for r in s["rounds"]
        )
        parts.append(
            f"<h2>{esc(s['case_id'])}</h2><table class='case'><tr>"
            f"<td>before (round 0)<br><img src='{esc(first['image'])}' alt='before'><br>"
            f"<span class='score'>{_num(s['pre_score'])}</span></td>"
            f"<td>LEGION mask (round 0)<br><img src='{esc(first['mask'])}' alt='mask'></td>"
            f"<td>after (best: round {s['best_round']})<br><img src='{esc(best['image'])}' alt='after'><br>"
            f"<span class='score'>{_num(s['post_score'])}</span></td>"
            f"<td style='max-width:28em'><b>prompt</b>: {esc(s['prompt'])}<br>"
            f"<b>LEGION explanation (before)</b>: {esc(first['explanation'] or '(none)')}<br>"
            f"<b>final prompt</b>: {esc(s['final_prompt'])}<br>"
            f"<b>LEGION explanation (after)</b>: {esc(best['explanation'] or '(none)')}<br>"
            f"<span class='muted'>stop: {esc(s['stop_reason'])}</span><ul class='muted'>{history}</ul></td>"
            "</tr></table>"
        )
    parts.append("</body></html>")
    path = out_dir / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
