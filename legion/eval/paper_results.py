"""The paper's own numbers (arXiv 2503.15264 v1; docs/paper_results.md), for side-by-side tables.

Values are percentages as printed. Column names are the ones `legion.eval.report` builds from
our metrics.json files, so a paper row lines up with our rows:

    localization (Table 2):  "<column> mIoU", "<column> F1"  for Object, Animal, Human, Scene, LOKI, RichHF-18K
    explanation  (Table 3):  "<column> ROUGE-L", "<column> CSS"  for SynthScars, LOKI
    detection    (Table 5):  GANs, Deepfakes, CRN, IMLE, SITD, SAN, Diffusion  (accuracy)

Table 2 "gray" methods (Ferret, Griffon, Qwen2-VL-72B) predict most of the image as artifact and
were excluded from the paper's comparison; they are kept here with ``gray=True``.
"""

from __future__ import annotations

LOCALIZATION_COLUMNS = ("Object", "Animal", "Human", "Scene", "LOKI", "RichHF-18K")
EXPLANATION_COLUMNS = ("SynthScars", "LOKI")
DETECTION_COLUMNS = ("GANs", "Deepfakes", "CRN", "IMLE", "SITD", "SAN", "Diffusion")

# Table 2: method -> (mIoU, F1) per column in LOCALIZATION_COLUMNS order.
_TABLE2: list[tuple[str, bool, list[tuple[float, float]]]] = [
    ("HiFi-Net", False, [(43.74, 0.45), (45.28, 0.03), (46.21, 0.84), (45.90, 0.04), (39.60, 2.41), (44.96, 0.39)]),
    ("TruFor", False, [(46.99, 14.82), (48.45, 17.57), (49.02, 15.43), (48.93, 12.64), (46.55, 16.70), (48.41, 18.03)]),
    (
        "PAL4VST*",
        False,
        [(50.46, 19.25), (52.55, 21.61), (59.18, 35.70), (52.55, 19.14), (47.34, 11.58), (49.88, 14.78)],
    ),
    ("Ferret", True, [(30.10, 20.81), (27.17, 15.78), (25.54, 13.87), (30.64, 13.79), (24.50, 18.88), (26.52, 16.22)]),
    ("Griffon", True, [(38.54, 23.40), (27.76, 18.58), (23.04, 14.81), (35.83, 14.47), (21.96, 20.41), (28.13, 18.19)]),
    (
        "LISA-v1-7B*",
        False,
        [(35.49, 23.70), (32.44, 18.77), (34.11, 17.50), (37.56, 18.31), (31.10, 9.29), (35.90, 21.94)],
    ),
    (
        "InternVL2-8B",
        False,
        [(41.08, 13.36), (41.22, 7.83), (41.21, 3.91), (41.68, 7.55), (42.03, 10.06), (39.90, 9.58)],
    ),
    (
        "Qwen2-VL-72B",
        True,
        [(33.89, 23.25), (32.46, 21.98), (26.92, 14.75), (39.00, 18.17), (26.62, 20.99), (27.58, 19.02)],
    ),
    ("LEGION", False, [(54.62, 29.90), (54.52, 27.43), (60.82, 39.44), (53.67, 24.51), (48.66, 16.71), (50.07, 17.41)]),
]

# Table 3: method -> (SynthScars ROUGE-L, SynthScars CSS, LOKI ROUGE-L, LOKI CSS)
_TABLE3: list[tuple[str, tuple[float, float, float, float]]] = [
    ("Qwen2-VL", (25.84, 58.15, 11.80, 37.64)),
    ("LLaVA-v1.6", (29.61, 61.75, 16.07, 41.07)),
    ("InternVL2", (25.93, 56.89, 10.10, 39.62)),
    ("Deepseek-VL2", (25.50, 47.77, 6.70, 28.76)),
    ("GPT-4o", (22.43, 53.55, 9.61, 38.98)),
    ("LEGION", (39.50, 72.60, 18.55, 45.96)),
]

# Table 5: method -> accuracy per DETECTION_COLUMNS
_TABLE5: list[tuple[str, tuple[float, ...]]] = [
    ("Co-occurence", (75.17, 59.14, 73.06, 87.21, 68.98, 60.42, 85.53)),
    ("Freq-spec", (75.28, 45.18, 53.61, 50.98, 47.46, 57.12, 69.00)),
    ("CNNSpot", (85.29, 53.47, 86.31, 86.26, 66.67, 48.69, 58.63)),
    ("Patchfor", (69.97, 75.54, 72.33, 55.30, 75.14, 75.28, 72.54)),
    ("UniFD", (95.25, 66.60, 59.50, 72.00, 63.00, 57.50, 82.02)),
    ("LDGard", (89.17, 58.00, 50.74, 50.78, 62.50, 50.00, 89.79)),
    ("FreqNet", (94.23, 97.40, 71.92, 67.35, 88.92, 59.04, 83.34)),
    ("NPR", (94.16, 76.89, 50.00, 50.00, 66.94, 98.63, 94.54)),
    ("LEGION", (97.01, 63.37, 90.78, 98.93, 79.44, 57.76, 83.10)),
]


def paper_rows(kind: str, include_gray: bool = True) -> list[dict]:
    """Paper rows for ``kind`` in localization | explanation | detection, each a dict with
    ``run`` ("paper: <method>") and the table's columns. Detection rows also get the derived
    unweighted ``Mean`` over the seven columns (not printed in the paper)."""
    rows: list[dict] = []
    if kind == "localization":
        for method, gray, cells in _TABLE2:
            if gray and not include_gray:
                continue
            row = {"run": f"paper: {method}" + (" (gray)" if gray else "")}
            for column, (miou, f1) in zip(LOCALIZATION_COLUMNS, cells):
                row[f"{column} mIoU"], row[f"{column} F1"] = miou, f1
            rows.append(row)
    elif kind == "explanation":
        for method, (sr, sc, lr, lc) in _TABLE3:
            rows.append(
                {
                    "run": f"paper: {method}",
                    "SynthScars ROUGE-L": sr,
                    "SynthScars CSS": sc,
                    "LOKI ROUGE-L": lr,
                    "LOKI CSS": lc,
                }
            )
    elif kind == "detection":
        for method, accs in _TABLE5:
            row = {"run": f"paper: {method}", **dict(zip(DETECTION_COLUMNS, accs))}
            row["Mean"] = round(sum(accs) / len(accs), 2)
            rows.append(row)
    else:
        raise ValueError(f"unknown table kind {kind!r}; choose localization, explanation or detection")
    return rows


# Foreground-protocol numbers from third parties (docs/paper_results.md §7.2; NOT the paper, low
# authority), on a 0-100 scale: mean FG IoU, mean FG F1, global FG IoU, global FG F1.
THIRD_PARTY_FOREGROUND: list[dict] = [
    {
        "run": "audit: public legion_LE, SynthScars test",
        "dataset": "synthscars",
        "fg_iou": 22.3234,
        "fg_f1": 32.1147,
        "global_fg_iou": 24.1450,
        "global_fg_f1": 38.8980,
    },
    {
        "run": "audit: LEGION re-trained, SynthScars test",
        "dataset": "synthscars",
        "fg_iou": 19.6195,
        "fg_f1": 28.6687,
        "global_fg_iou": 20.0490,
        "global_fg_f1": 33.4014,
    },
    {
        "run": "audit: public legion_LE, LOKI-229",
        "dataset": "loki",
        "fg_iou": 9.8816,
        "fg_f1": 16.0061,
        "global_fg_iou": 11.6530,
        "global_fg_f1": 20.8735,
    },
]
