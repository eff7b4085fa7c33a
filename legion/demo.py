"""The embedded default: the whole LEGION pipeline on ToyScars with a tiny model, on the CPU.

    legion demo [--output-dir demo_out] [--fresh] [--num-train 400 --num-test 100]

Stages (each runs the same command a user runs on a cluster; a finished stage is reused on the
next run unless its inputs changed or --fresh is given):

  1. make-toy-data     ToyScars in the SynthScars layout + a real/fake split
  2. make-tiny         a tiny random LEGION checkpoint (tiny CLIP + LLaMA + SAM)
  3. train             DeepSpeed + LoRA recipe, configs/tiny/train_loc_exp.yaml
  4. merge             step1 (ZeRO checkpoint -> fp32 safetensors), step2 (LoRA merged -> model dir)
  5. cls-train         the real/fake detector head on the merged model's CLIP
  6. infer             gated inference on the test images (+ a few real images for the gallery)
  7. eval              localization, explanation and detection metrics from the saved predictions
  8. report            demo_out/report.html + report.md (tables, loss curve, gallery), then the
                       `legion app` command that opens a web page on the trained model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from legion.cli_args import add_output_dir_argument, check_output_dir_argument
from legion.errors import LegionError, OptionError
from legion.utils.io import atomic_write_text
from legion.utils.run_info import recorded

REPO = Path(__file__).resolve().parents[1]
GALLERY_FAKE, GALLERY_REAL = 12, 4


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "legion.cli", *args]


class Stages:
    """Runs commands as stages; a stage whose marker matches its fingerprint is skipped."""

    def __init__(self, out: Path, fresh: bool):
        self.out = out
        self.markers = out / ".stages"
        if fresh and out.exists():
            shutil.rmtree(out)
        self.markers.mkdir(parents=True, exist_ok=True)
        self.timings: list[tuple[str, float, bool]] = []
        self._chain = ""  # fingerprints chain: a re-run stage invalidates everything after it

    def run(self, name: str, commands: list[list[str]], fingerprint: dict, number: int, total: int) -> None:
        self._chain = hashlib.sha256((self._chain + json.dumps(fingerprint, sort_keys=True)).encode()).hexdigest()
        marker = self.markers / f"{name}.done"
        title = f"[{number}/{total}] {name}"
        if marker.is_file() and marker.read_text() == self._chain:
            print(f"{title}: done earlier, reused (--fresh to redo)", flush=True)
            self.timings.append((name, 0.0, True))
            return
        marker.unlink(missing_ok=True)
        print(f"{title} ...", flush=True)
        start = time.perf_counter()
        for cmd in commands:
            print("  $ " + " ".join(_short(c) for c in cmd[2:]), flush=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            result = subprocess.run(cmd, cwd=REPO, env=env)
            if result.returncode != 0:
                raise LegionError(
                    f"stage '{name}' failed (exit {result.returncode}); fix the error above "
                    "and re-run: finished stages are reused"
                )
        seconds = time.perf_counter() - start
        atomic_write_text(marker, self._chain)
        self.timings.append((name, seconds, False))
        print(f"{title}: {seconds:.0f} s", flush=True)


def _short(arg: str) -> str:
    return arg.replace(str(REPO) + os.sep, "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_dir_argument(parser, default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--fresh", action="store_true", help="delete --output-dir and redo every stage")
    parser.add_argument("--num-train", type=int, default=400, help="ToyScars training images (default 400)")
    parser.add_argument("--num-test", type=int, default=100, help="ToyScars test images (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed (default 0)")
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra key=value for the training config (repeatable), e.g. schedule.epochs=2",
    )


@recorded("demo", lambda args: args.output_dir, eager=False)  # --fresh empties the folder first
def run(args: argparse.Namespace) -> int:
    if args.num_train < 1 or args.num_test < 1:
        raise OptionError("--num-train and --num-test must be >= 1")
    bad = [item for item in args.train_override if "=" not in item]
    if bad:
        raise OptionError(f"--train-override {bad[0]!r} is not of the form key=value")
    check_output_dir_argument(args.output_dir)
    out = Path(args.output_dir).resolve()
    st = Stages(out, args.fresh)
    data, tiny, train = out / "data", out / "tiny_model", out / "train"
    merged, detector, preds, preds_real, ev = (
        out / "model",
        out / "detector",
        out / "predictions",
        out / "predictions_real",
        out / "eval",
    )
    total = 8
    start = time.perf_counter()

    st.run(
        "make-toy-data",
        [
            _cli(
                "make-toy-data",
                "--output-dir",
                str(data),
                "--num-train",
                str(args.num_train),
                "--num-test",
                str(args.num_test),
                "--seed",
                str(args.seed),
            )
        ],
        {"n": [args.num_train, args.num_test], "seed": args.seed, "v": 2},
        1,
        total,
    )
    st.run(
        "make-tiny",
        [_cli("make-tiny", "--output-dir", str(tiny), "--seed", str(args.seed))],
        {"seed": args.seed},
        2,
        total,
    )
    st.run(
        "train",
        [
            _cli(
                "train",
                "--config",
                "configs/tiny/train_loc_exp.yaml",
                f"output_dir={train}",
                f"model.path={tiny}",
                f"data.root={data}",
                "export.merged_model=false",
                *args.train_override,
            )
        ],
        {"config": _file_hash(REPO / "configs/tiny/train_loc_exp.yaml"), "over": args.train_override},
        3,
        total,
    )
    st.run(
        "merge",
        [
            _cli(
                "merge", "step1", str(train / "checkpoints"), "--output-dir", str(out / "merge" / "weights.safetensors")
            ),
            _cli(
                "merge",
                "step2",
                "--base",
                str(tiny),
                "--weights",
                str(out / "merge" / "weights.safetensors"),
                "--output-dir",
                str(merged),
            ),
        ],
        {},
        4,
        total,
    )
    st.run(
        "cls-train",
        [
            _cli(
                "cls-train",
                "--config",
                "configs/tiny/train_cls.yaml",
                f"data.train={data}/detection/train",
                f"model.backbone={merged}",
                f"output_dir={detector}",
                f"feature_cache_dir={out}/cache/detector_features",
            )
        ],
        {"config": _file_hash(REPO / "configs/tiny/train_cls.yaml")},
        5,
        total,
    )
    infer_common = [
        "--config",
        "configs/tiny/infer.yaml",
        f"model_path={merged}",
        f"detector_path={detector}",
        "save_reference_layout=false",
        "save_overlay=false",
        "save_phrase_masks=false",
        "resume=false",
        "overwrite=true",  # a re-run stage (after training or the detector changed) replaces its predictions
    ]
    st.run(
        "infer",
        [
            _cli("infer", *infer_common, f"image_dir={data}/test/images", f"output_dir={preds}"),
            _cli(
                "infer",
                *infer_common,
                f"image_dir={data}/detection/test/toyscars/0_real",
                f"output_dir={preds_real}",
                f"max_images={GALLERY_REAL}",
            ),
        ],
        {"config": _file_hash(REPO / "configs/tiny/infer.yaml")},
        6,
        total,
    )
    st.run(
        "eval",
        [
            *[
                _cli(
                    "eval",
                    kind,
                    "--pred",
                    str(preds / "predictions.jsonl"),
                    "--gt",
                    str(data),
                    "--dataset",
                    "synthscars",
                    "--output-dir",
                    str(ev / kind),
                )
                for kind in ("localization", "explanation")
            ],
            _cli(
                "cls-eval",
                "--config",
                "configs/tiny/eval_cls.yaml",
                f"detector_path={detector}",
                f"data.test={data}/detection/test",
                f"output_dir={ev / 'detection'}",
            ),
        ],
        {},
        7,
        total,
    )
    print("[8/8] report ...", flush=True)
    html_path, md_path = write_demo_report(out)
    elapsed = time.perf_counter() - start
    print(f"[8/8] report: {html_path}\n      {md_path}")
    print(
        f"demo finished in {elapsed / 60:.1f} min "
        f"({', '.join(f'{n} {s:.0f}s' + (' (reused)' if r else '') for n, s, r in st.timings)})"
    )
    print(f"\nLook at your own images with the trained model in a web page:\n  {app_command(out)}")
    return 0


def app_command(out: Path) -> str:
    """The `legion app` command line for the model and detector this demo trained, with ToyScars examples."""
    import shlex

    def short(path: Path) -> str:
        relative = os.path.relpath(path)
        return shlex.quote(relative if not relative.startswith("..") else str(path))

    examples = [out / "data" / "test" / "images", out / "data" / "detection" / "test" / "toyscars" / "0_real"]
    return (
        f".venv/bin/legion app --model {short(out / 'model')} --detector {short(out / 'detector')} "
        f"--examples {' '.join(short(e) for e in examples)}"
    )


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --- report ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_demo_report(out: Path) -> tuple[Path, Path]:
    """report.html / report.md from the demo's saved outputs, with `legion report`'s code (never a live model)."""
    from legion.report import build_report

    intro = (
        "LEGION's whole pipeline on ToyScars (procedural images with planted artifacts) with a tiny, "
        "randomly initialised model trained on the CPU: DeepSpeed + LoRA training, merge, detector, gated "
        "inference, evaluation. The numbers show the pipeline works end to end; they are not the paper's. "
        "Fake images the detector judged real count as empty predictions."
    )
    runs = [out / "train", out / "predictions", out / "predictions_real", out / "eval"]
    return build_report(
        [r for r in runs if r.is_dir()],
        out,
        gt=out / "data",
        gallery_size=GALLERY_FAKE,
        title="LEGION demo report",
        intro=intro,
    )
