"""Faults and bad input (issue 20): every item gets a clear error or a correct result, and nothing is lost.

One section per item of the issue; each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from legion.cli import main

REPO = Path(__file__).resolve().parents[1]
CAPTION = "Upon examining the image. I have found: Image {name}.\nTo elaborate, I have found the following artifacts. "


def _env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LEGION_DEBUG"):
        env.pop(key, None)
    return env


def _synthscars(root: Path, names=("a.png",), size=(20, 30), split="test") -> Path:
    """A SynthScars-layout split: one 10x10 artifact in the corner of each (black) image."""
    (root / split / "annotations").mkdir(parents=True)
    (root / split / "images").mkdir(parents=True)
    records = []
    for i, name in enumerate(names):
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / split / "images" / name)
        ref = {"sentence": "part", "explanation": "bent.", "bbox": None, "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}
        caption = CAPTION.format(name=name) + "part:bent."
        records.append({str(i): {"img_file_name": name, "caption": caption, "refs": [ref]}})
    (root / split / "annotations" / f"{split}.json").write_text(json.dumps(records))
    return root


def _prediction(name: str, size=(20, 30), **fields) -> dict:
    from legion.utils.rle import mask_to_rle

    mask = np.zeros(size, np.uint8)
    mask[0:5, 0:10] = 1
    record = {"image": name, "width": size[1], "height": size[0], "verdict": "fake", "fake_prob": None}
    record.update(explanation="part bent.", phrases=["part"], masks=[mask_to_rle(mask)], union_mask=mask_to_rle(mask))
    record.update(fields)
    return record


def _write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _eval_args(kind, pred, gt, out):
    args = ["eval", kind, "--pred", str(pred), "--gt", str(gt), "--dataset", "synthscars", "--output-dir", str(out)]
    return args + (["--workers", "1", "--no-plots"] if kind == "localization" else ["--no-css"])


# ------------------------------------------------------------------ 1. malformed RLE: no hang, no wrong area
def test_rle_problem_names_what_is_wrong():
    from legion.utils.rle import mask_to_rle, rle_problem

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (0, 4), (7, 5), (64, 48), (300, 200)]:
        for p in (0.0, 0.01, 0.5, 1.0):
            assert rle_problem(mask_to_rle(rng.random(shape) < p)) is None
    assert rle_problem({"size": [32, 32], "counts": [10, 5, 1009]}) is None
    assert "add up to 1015, not 32x32 = 1024" in rle_problem({"size": [32, 32], "counts": [10, 5, 1000]})
    assert "add up to" in rle_problem({"size": [32, 32], "counts": ":5Xo0"})  # the same, compressed
    assert "negative" in rle_problem({"size": [32, 32], "counts": [10, -5, 1019]})
    assert "alphabet" in rle_problem({"size": [4, 4], "counts": "~~"})
    assert "middle of a number" in rle_problem({"size": [4, 4], "counts": "0P"})
    assert "size" in rle_problem({"size": [-1, 4], "counts": ""})
    assert "size" in rle_problem({"size": [10**6, 10**6], "counts": ""})
    assert "size" in rle_problem({"size": "32x32", "counts": ""})


@pytest.mark.timeout(120)
def test_eval_refuses_a_malformed_mask_instead_of_hanging(tmp_path):
    """Run lengths that do not add up to h x w made pycocotools' merge spin forever (issue 20, item 1)."""
    root = _synthscars(tmp_path / "SynthScars")
    bad = _prediction("a.png", union_mask={"size": [20, 30], "counts": [10, 5, 100]})
    pred = _write_jsonl(tmp_path / "infer" / "predictions.jsonl", [bad])
    cmd = [sys.executable, "-m", "legion.cli", *_eval_args("localization", pred, root, tmp_path / "eval")]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "a.png" in out.stderr and "malformed RLE mask" in out.stderr and "add up to 115, not 20x30" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "eval" / "metrics.json").exists()


def test_eval_refuses_a_malformed_mask_where_no_merge_happens(tmp_path):
    """With an empty ground truth no merge runs: the area of a malformed mask was silently wrong."""
    from legion.errors import DataError
    from legion.eval.ground_truth import GroundTruthItem
    from legion.eval.localization import evaluate_localization
    from legion.utils.rle import mask_to_rle

    gt = {"a.png": GroundTruthItem("a.png", union_rle=mask_to_rle(np.zeros((20, 30), np.uint8)))}
    bad = _prediction("a.png", masks=[{"size": [20, 30], "counts": [0, 700]}], union_mask=None)
    with pytest.raises(DataError, match=r"a\.png.*masks\[0\].*add up to 700, not 20x30 = 600"):
        evaluate_localization([bad], gt)


# ---------------------------------------------- 11. eval: duplicates, predictions of other images, empty files
def test_eval_refuses_duplicated_records(tmp_path, capsys):
    root = _synthscars(tmp_path / "SynthScars", names=("a.png", "b.png"))
    pred = _write_jsonl(tmp_path / "p" / "predictions.jsonl", [_prediction("a.png"), _prediction("b.png")] * 2)
    for kind in ("localization", "explanation"):
        assert main(_eval_args(kind, pred, root, tmp_path / kind)) == 1
        err = capsys.readouterr().err
        assert "2 records for a.png" in err and "b.png" in err, err
        assert not (tmp_path / kind / "metrics.json").exists()


def test_eval_refuses_predictions_made_on_other_images_with_the_same_names(tmp_path, capsys):
    """`legion infer` on another folder whose files carry the ground truth's names: matched by file name
    alone, those predictions were scored against the wrong images."""
    root = _synthscars(tmp_path / "SynthScars", names=("a.png", "b.png"))
    other = tmp_path / "other"
    other.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(other / name)
    out = tmp_path / "infer_other"
    pred = _write_jsonl(out / "predictions.jsonl", [_prediction("a.png"), _prediction("b.png")])
    (out / "infer_config.yaml").write_text(f"image_dir: {other}\nimage_list: null\n")
    assert main(_eval_args("localization", pred, root, tmp_path / "eval")) == 1
    err = capsys.readouterr().err
    assert "2 predictions are for other images" in err and str(other) in err and "a.png" in err, err

    # the same names in a copy of the ground-truth images (same bytes): accepted
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("a.png", "b.png"):
        (copy / name).write_bytes((root / "test" / "images" / name).read_bytes())
    (out / "infer_config.yaml").write_text(f"image_dir: {copy}\nimage_list: null\n")
    assert main(_eval_args("localization", pred, root, tmp_path / "eval")) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["overall"]["num_images"] == 2 and metrics["overall"]["num_missing"] == 0


def test_eval_refuses_predictions_of_other_images_from_any_working_folder(tmp_path, capsys, monkeypatch, tiny_model):
    """`legion infer image_dir=other` (relative) and `legion eval` run from another folder: the predictions'
    folder is the one infer resolved, not `other` under eval's working folder (where the check was skipped)."""
    from legion.infer import Analyzer, InferConfig, run_inference

    root = _synthscars(tmp_path / "SynthScars", names=("a.png", "b.png"))
    (tmp_path / "other").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "other" / name)
    monkeypatch.chdir(tmp_path)
    analyzer = Analyzer(*tiny_model, sam_input_size=None, max_new_tokens=3)
    run_inference(InferConfig(image_dir="other", output_dir="infer_other", num_workers=0, progress=False), analyzer)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    pred = tmp_path / "infer_other" / "predictions.jsonl"
    assert main(_eval_args("localization", pred, root, tmp_path / "eval")) == 1
    err = capsys.readouterr().err
    assert "2 predictions are for other images" in err and str(tmp_path / "other") in err, err


def test_eval_refuses_an_empty_predictions_file(tmp_path, capsys):
    root = _synthscars(tmp_path / "SynthScars")
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("\n")
    for kind in ("localization", "explanation"):
        assert main(_eval_args(kind, pred, root, tmp_path / kind)) == 1
        assert "no prediction records" in capsys.readouterr().err
        assert not (tmp_path / kind / "metrics.json").exists()


# ---------------------------------------------------------------- 6. the prompt reviser never leaks its key
class _Server:
    """A one-route HTTP server on 127.0.0.1 recording each request's path and Authorization header;
    `answer(handler)` writes the response."""

    def __init__(self, answer):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                owner.requests.append((self.command, self.path, self.headers.get("Authorization")))
                answer(self)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _json_answer(handler, status=200):
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "a leaked answer"}}]}).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("code", [301, 302, 303, 307])
def test_reviser_refuses_redirects_and_never_sends_its_key_elsewhere(monkeypatch, code):
    from legion.controller.prompt_reviser import ReviserConfig, ReviserError, build_reviser

    with _Server(_json_answer) as other:

        def redirect(handler):
            handler.send_response(code)
            handler.send_header("Location", other.url + "/v1/chat/completions")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with _Server(redirect) as endpoint:
            monkeypatch.setenv("OPENAI_BASE_URL", endpoint.url + "/v1")
            monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
            reviser = build_reviser(ReviserConfig(backend="openai", retries=0))
            with pytest.raises(ReviserError, match=r"redirected \(HTTP \d+\) to another host"):
                reviser.revise("a prompt", "an explanation")
    assert endpoint.requests == [("POST", "/v1/chat/completions", "Bearer sk-secret")]
    assert other.requests == []  # the key never reached the other host, and its answer was not used


def test_reviser_endpoint_and_key_never_come_from_the_config(monkeypatch, tmp_path, capsys):
    """A config file naming another variable (any secret of the environment) and another default host."""
    from legion.config import ConfigError
    from legion.controller.prompt_reviser import ReviserConfig, build_reviser

    monkeypatch.setenv("SOME_OTHER_SECRET", "aws-secret")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    for key, value in [("api_key_env", "SOME_OTHER_SECRET"), ("default_base_url", "http://127.0.0.1:9/v1")]:
        with pytest.raises(ConfigError, match=f"reviser.{key}.*not settable.*OPENAI_"):
            build_reviser(ReviserConfig(backend="openai", **{key: value}))
    # the CLI refuses it before loading anything (usage error, exit code 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    code = main(
        ["regenerate", "--config", str(REPO / "configs/tiny/regenerate.yaml"), "--prompts", str(prompts)]
        + ["--output-dir", str(tmp_path / "out"), "reviser.backend=openai", "reviser.api_key_env=SOME_OTHER_SECRET"]
    )
    assert code == 2 and "not settable" in capsys.readouterr().err


# ------------------------------------------------- 2. infer: no stale records under another run's settings
def _infer(model_dir, image_dir, out, *overrides):
    args = ["infer", "--config", str(REPO / "configs/tiny/infer.yaml"), f"model_path={model_dir}"]
    args += [f"image_dir={image_dir}", f"output_dir={out}", "max_new_tokens=3", "progress=false"]
    return main(args + ["save_overlay=false", "save_phrase_masks=false", *overrides])


def _images(folder: Path, names=("a.png", "b.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / os.fsdecode(name))
    return folder


def test_infer_rerun_with_other_settings_is_refused_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    import shutil

    from legion.model.builders import make_tiny

    images, out = _images(tmp_path / "imgs"), tmp_path / "infer"
    assert _infer(tiny_model_dir, images, out) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    other_model = make_tiny(tmp_path / "other_model", seed=1)  # the same architecture, other weights
    for override, named in [
        ("perturb=jpeg:50", "perturb: none -> jpeg:50"),
        (f"model_path={other_model}", "model_path: "),
        ("max_new_tokens=4", "max_new_tokens: 3 -> 4"),
    ]:
        assert _infer(tiny_model_dir, images, out, override) == 2
        err = capsys.readouterr().err
        assert named in err and "overwrite=true" in err, err
        # nothing was touched: the records, their config and summary, the run record
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    moved = tmp_path / "moved_model"
    shutil.copytree(tiny_model_dir, moved)  # the same model elsewhere: the same settings, resumed
    assert _infer(moved, images, out) == 0
    assert json.loads((out / "infer_summary.json").read_text())["resumed"] == 2

    assert _infer(tiny_model_dir, images, out, "perturb=jpeg:50", "overwrite=true") == 0
    summary = json.loads((out / "infer_summary.json").read_text())
    assert summary["resumed"] == 0 and summary["perturbation"]["kind"] == "jpeg"
    assert "perturb: jpeg:50" in (out / "infer_config.yaml").read_text()
    assert _infer(tiny_model_dir, images, out, "perturb=jpeg:50") == 0  # now they match: resumed
    assert json.loads((out / "infer_summary.json").read_text())["resumed"] == 2


# ------------------------------------------------------ 5. file names of any bytes (not valid UTF-8)
def test_infer_handles_file_names_that_are_not_utf8(tiny_model_dir, tmp_path):
    from legion.infer import read_records

    bad = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8
    images = _images(tmp_path / "imgs", names=("a.png", b"caf\xe9 \xff.png"))
    out = tmp_path / "infer"
    assert _infer(tiny_model_dir, images, out, "save_reference_layout=true") == 0
    records = {r["image"]: r for r in read_records(out / "predictions.jsonl")}
    assert set(records) == {"a.png", bad} and records[bad]["verdict"] == "fake"
    (out / "predictions.jsonl").read_bytes().decode("utf-8")  # still a UTF-8 file (\udcXX escapes)
    assert (out / bad / "mask.png").is_file() and os.fsencode(out / bad).endswith(b"caf\xe9 \xff.png")
    explanation = json.loads((out / bad / "explanation.json").read_text())
    assert list(explanation) == [f"{images}/{bad}"]
    assert _infer(tiny_model_dir, images, out, "save_reference_layout=true") == 0  # a rerun resumes both
    assert json.loads((out / "infer_summary.json").read_text())["resumed"] == 2


# ------------------------------------------------------------------ 10. merges write a folder atomically
def _lora_weights(model, path: Path, seed: int) -> Path:
    """The model's weights with a LoRA pair on one projection (what training saves), as safetensors."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    key = "model.layers.0.self_attn.q_proj"
    base = state.pop(f"{key}.weight")
    gen = torch.Generator().manual_seed(seed)
    state[f"{key}.base_layer.weight"] = base
    state[f"{key}.lora_A.default.weight"] = torch.randn(8, base.shape[1], generator=gen)
    state[f"{key}.lora_B.default.weight"] = torch.randn(base.shape[0], 8, generator=gen)
    save_file(state, str(path))
    return path


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_step2_writes_a_temporary_folder_and_renames_it(tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    import errno

    from legion.merge import step2
    from legion.model import export
    from legion.model.builders import load_model

    model, _ = tiny_model
    target = tmp_path / "models" / "merged"
    real_save = export.save_safetensors

    def disk_full(*args, **kwargs):  # the weights are half written when the disk fills up
        real_save(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    # a first merge that fails half-way leaves nothing that looks like a model
    monkeypatch.setattr(export, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        step2(tiny_model_dir, _lora_weights(model, tmp_path / "w1.safetensors", 1), target, dtype="float32")
    assert not target.exists() and os.listdir(target.parent) == []

    monkeypatch.setattr(export, "save_safetensors", real_save)
    step2(tiny_model_dir, tmp_path / "w1.safetensors", target, dtype="float32")
    old = _tree(target)
    assert "config.json" in old and "model.safetensors" in old

    # a re-merge of other weights that fails leaves the old model intact under its name
    monkeypatch.setattr(export, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        step2(tiny_model_dir, _lora_weights(model, tmp_path / "w2.safetensors", 2), target, dtype="float32")
    assert _tree(target) == old and os.listdir(target.parent) == ["merged"]
    assert load_model(target, verbose=False)[2].ok

    # a re-merge that succeeds replaces it whole
    monkeypatch.setattr(export, "save_safetensors", real_save)
    step2(tiny_model_dir, tmp_path / "w2.safetensors", target, dtype="float32")
    assert _tree(target)["model.safetensors"] != old["model.safetensors"] and os.listdir(target.parent) == ["merged"]


def test_export_refuses_to_replace_a_folder_that_is_not_a_model(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "my_documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    assert main(["export", str(tiny_model_dir), "--output-dir", str(folder), "--dtype", "float32"]) == 2
    assert "not a model folder" in capsys.readouterr().err and _tree(folder) == {"thesis.tex": b"years of work"}
    out = tmp_path / "exported"
    assert main(["export", str(tiny_model_dir), "--output-dir", str(out), "--dtype", "float32"]) == 0
    assert (out / "config.json").is_file() and sorted(os.listdir(tmp_path)) == ["exported", "my_documents"]


def test_merge_step2_of_weights_without_lora(tiny_model, tiny_model_dir, tmp_path):
    """Fully fine-tuned weights (no LoRA pair) used to fail formatting the model card (scale None)."""
    from safetensors.torch import save_file

    from legion.merge import step2

    model, _ = tiny_model
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.st"))
    (tmp_path / "w.st").rename(tmp_path / "w.safetensors")
    report = step2(tiny_model_dir, tmp_path / "w.safetensors", tmp_path / "merged", dtype="float32")
    assert report["merged_modules"] == 0 and "no LoRA" in (tmp_path / "merged" / "README.md").read_text()


# ------------------------------------------------------- 8. every setting checked before any model is loaded
@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model (or starting DeepSpeed) fails the test: the settings must be refused before."""
    import legion.model.builders
    import legion.model.detector
    import legion.train.loc_exp

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded (or DeepSpeed started) before the settings were checked")

    for module, name in [
        (legion.model.builders, "load_model"),
        (legion.train.loc_exp, "setup_distributed"),
        (legion.model.detector, "build_detector"),
        (legion.model.detector, "load_detector"),
    ]:
        monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.every_steps=0", "checkpoint.every_steps must be >= 1, got 0"),
        ("schedule.global_batch_size=0", "schedule.global_batch_size must be >= 1, got 0"),
        ("optim.lr=-1e-4", "optim.lr must be > 0, got -0.0001"),
        ("validation.every_steps=0", "validation.every_steps must be >= 1"),
        ("logging.every_steps=0", "logging.every_steps must be >= 1"),
        ("schedule.max_steps=0", "schedule.max_steps must be >= 1 or null"),
        ("schedule.micro_batch_size=0", "schedule.micro_batch_size must be >= 1 or null, got 0"),
        ("schedule.micro_batch_size=big", "schedule.micro_batch_size must be auto or a number, got 'big'"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing must be auto or a bool, got 'maybe'"),
        ("lora.r=0", "lora.r must be >= 1"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("deepspeed.config_file=nowhere.json", "deepspeed.config_file not found"),
    ],
)
def test_train_settings_are_checked_before_any_model_is_loaded(
    tiny_model_dir, toy_data_dir, tmp_path, capsys, no_loading, override, message
):
    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs/tiny/train_loc_exp.yaml"), f"model.path={tiny_model_dir}"]
    assert main([*args, f"data.root={toy_data_dir}", f"output_dir={out}", override]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "command, override, message",
    [
        ("cls-train", "batch_size=0", "batch_size must be >= 1"),
        ("cls-train", "optim.lr=-1", "optim.lr must be > 0"),
        ("cls-train", "epochs=0", "epochs must be >= 1"),
        ("cls-eval", "batch_size=0", "batch_size must be >= 1"),
        ("cls-eval", "dtype=float64", "dtype must be one of"),
        ("infer", "max_new_tokens=-5", "max_new_tokens must be >= 1"),
    ],
)
def test_detector_and_infer_settings_are_checked_before_any_model_is_loaded(
    tiny_model_dir, toy_data_dir, tmp_path, capsys, no_loading, command, override, message
):
    out = tmp_path / "out"
    paths = {
        "cls-train": [f"model.backbone={tiny_model_dir}", f"data.train={toy_data_dir / 'detection' / 'train'}"],
        "cls-eval": [f"detector_path={tiny_model_dir}", f"data.test={toy_data_dir / 'detection' / 'test'}"],
        "infer": [f"model_path={tiny_model_dir}", f"image_dir={toy_data_dir}"],
    }[command]
    assert main([command, *paths, f"output_dir={out}", override]) == 2
    assert message in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------ 3. unreadable training data is an error
def _truncate_images(data_dir: Path, split: str = "train", keep: int = 100) -> list[Path]:
    """Cut every image of the split after its header (the header still reads; the pixels do not)."""
    files = sorted((data_dir / split / "images").iterdir())
    for path in files:
        path.write_bytes(path.read_bytes()[:keep])
    return files


def test_data_check_quick_finds_truncated_images_and_names_every_record(toy_data_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "toy"
    shutil.copytree(toy_data_dir, data)
    files = _truncate_images(data)
    args = ["data", "check", "--root", str(data), "--split", "train", "--quick"]
    assert main([*args, "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["usable_records"] == 0 and summary["images"]["unreadable"] == {"truncated": len(files)}
    named = summary["unusable"]["image_unreadable"]
    assert sorted(e["file"] for e in named) == sorted(str(p) for p in files)  # --json: every one of them
    assert all("truncated" in e["detail"] and e["record"] for e in named)
    assert sorted(f["file"] for f in summary["images"]["unreadable_files"]) == sorted(str(p) for p in files)

    assert main(args) == 1  # text: the first 5 per reason, and how many more
    out = capsys.readouterr().out
    assert f"image_unreadable ({len(files)} records):" in out and f"and {len(files) - 5} more" in out
    assert str(files[0]) in out and "verdict: NOT USABLE" in out


def test_step_guard_stops_a_step_without_usable_samples_and_too_many_unusable_samples():
    import torch

    from legion.errors import DataError
    from legion.train.loc_exp import StepGuard

    guard = StepGuard(torch.device("cpu"), 1, run_samples=40, max_unusable_fraction=0.1, hint="legion data check")
    ok = {"input_ids": torch.zeros(1, 3), "skipped": [("r7", "truncated")]}
    guard.add(ok, 2)
    guard.add(ok, 2)
    assert guard.end_step(1) is False  # 2 of 4 samples usable: trained on, counted
    guard.add(None, 2)  # a micro-batch whose every image failed
    guard.add(None, 2)
    with pytest.raises(DataError, match=r"step 2: none of its 4 samples could be loaded \(e\.g\. record r7: truncated"):
        guard.end_step(2)
    guard = StepGuard(torch.device("cpu"), 1, run_samples=40, max_unusable_fraction=0.1)  # 4 may fail
    for step in (1, 2):
        guard.add(ok, 2)
        guard.add(ok, 2)
        assert guard.end_step(step) is False  # 2, then 4 unusable samples: within the tolerance
    guard.add(ok, 2)
    guard.add(ok, 2)
    with pytest.raises(DataError, match=r"6 of the 12 samples .* more than data.max_unusable_fraction=0.1 of the 40"):
        guard.end_step(3)


def _train_args(model_dir, data_dir, out_dir, **extra):
    values = {
        "model.path": model_dir,
        "data.root": data_dir,
        "output_dir": out_dir,
        "data.val_size": 2,
        "data.num_workers": 0,
        "schedule.global_batch_size": 4,
        "schedule.micro_batch_size": 2,
        "schedule.max_steps": 3,
        "optim.warmup_steps": 2,
        "checkpoint.every_steps": 100,
        "validation.every_steps": 100,
        "logging.progress": "false",
        "export.merged_model": "false",
    }
    values.update(extra)
    cmd = [sys.executable, "-m", "legion.cli", "train", "--config", str(REPO / "configs/tiny/train_loc_exp.yaml")]
    return cmd + [f"{k}={v}" for k, v in values.items()]


def _events(out_dir, kind):
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == kind]


@pytest.mark.slow
def test_training_on_unreadable_images_stops_with_a_clear_error(tiny_model_dir, toy_data_dir, tmp_path):
    import shutil

    data = tmp_path / "toy"
    shutil.copytree(toy_data_dir, data)
    _truncate_images(data)
    out = tmp_path / "run"
    proc = subprocess.run(
        _train_args(tiny_model_dir, data, out), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "step 1: none of its 4 samples could be loaded" in proc.stderr and "legion data check" in proc.stderr
    assert "Traceback" not in proc.stderr and not _events(out, "train")
    assert not list((out / "checkpoints").glob("global_step*"))  # no checkpoint of an untrained model


# ------------------------------------------------------- Slurm: SIGTERM / SIGUSR1 save a checkpoint and stop
@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_exits_75_and_resumes_to_the_same_weights(
    tiny_model_dir, toy_data_dir, tmp_path, signame
):
    """Slurm preemption: the signal arrives mid-run; the run saves at the next step boundary (checkpoints are
    otherwise only written at the end here), exits 75, and the rerun ends with the same weights."""
    import signal
    import time

    import torch

    from legion.merge import fp32_state_dict_from_deepspeed

    reference = tmp_path / "uninterrupted"
    subprocess.run(_train_args(tiny_model_dir, toy_data_dir, reference), env=_env(), check=True, cwd=REPO, timeout=900)

    out = tmp_path / "preempted"
    cmd = _train_args(tiny_model_dir, toy_data_dir, out)
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not _events(out, "train") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signame))
    stderr = proc.communicate(timeout=900)[1]
    assert proc.returncode == 75, stderr[-2000:]
    (stopped,) = _events(out, "preempted")
    assert stopped["step"] < 3 and stopped["signal"] == signame
    assert f"legion train: stopped: {signame} received: stopped at step {stopped['step']}" in stderr
    assert [e["step"] for e in _events(out, "checkpoint")] == [stopped["step"]]
    assert json.loads((out / "run_info.json").read_text())["status"] == "interrupted"

    subprocess.run(cmd, env=_env(), check=True, cwd=REPO, timeout=900, stdout=subprocess.DEVNULL)
    assert _events(out, "start")[-1]["resumed"] is True and _events(out, "start")[-1]["step"] == stopped["step"]
    expected, got = (fp32_state_dict_from_deepspeed(d / "checkpoints")[0] for d in (reference, out))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def _fake_slurm(tmp_path: Path, python_body: str) -> dict:
    """`srun` (2 tasks, one after the other), `scontrol` and a `python` that record what they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\ncode=0\n'
        'for t in 0 1; do SLURM_PROCID=$t SLURM_LOCALID=$t "$@"; c=$?; [ $c -gt $code ] && code=$c; done\n'
        "exit $code\n",
        "scontrol": '#!/usr/bin/env bash\nif [ "$1" = show ]; then printf "nodeA\\nnodeB\\n"; '
        'else echo "$@" >> "$FAKE_LOG/scontrol"; fi\n',
        "python": "#!/usr/bin/env bash\n"
        'echo "$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $*" >> "$FAKE_LOG/python"\n' + python_body,
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path),
        PYTHON=str(bin_dir / "python"),
        SLURM_JOB_ID="12345",
        SLURM_JOB_NODELIST="node[A-B]",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    return env


@pytest.mark.parametrize("exit_code, requeued", [(75, True), (0, False), (1, False)])
def test_sbatch_script_launches_every_rank_and_requeues_a_preempted_run(tmp_path, exit_code, requeued):
    env = _fake_slurm(tmp_path, f"exit {exit_code}\n")
    script = REPO / "scripts" / "slurm" / "train_loc_exp.sbatch"
    proc = subprocess.run(
        ["bash", str(script), "model.path=m", "data.root=d"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == exit_code, proc.stderr
    config = REPO / "configs" / "legion_7b" / "train_loc_exp.yaml"
    calls = (tmp_path / "python").read_text().splitlines()
    port = 20000 + 12345 % 20000
    assert calls == [
        f"{rank} {rank} 2 nodeA {port} -m legion.cli train --config {config} model.path=m data.root=d"
        for rank in (0, 1)
    ]
    assert (tmp_path / "scontrol").is_file() == requeued
    if requeued:
        assert (tmp_path / "scontrol").read_text() == "requeue 12345\n"


def test_sbatch_script_waits_through_a_signal_for_the_checkpoint(tmp_path):
    """Slurm signals the batch shell too: it keeps waiting until training has saved and exited 75."""
    import signal
    import time

    env = _fake_slurm(tmp_path, 'sleep 1; [ "$RANK" = 0 ] && touch "$FAKE_LOG/saved"; exit 75\n')
    script = REPO / "scripts" / "slurm" / "train_loc_exp.sbatch"
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75 and (tmp_path / "saved").is_file(), err
    assert "waiting for the training to save" in err and (tmp_path / "scontrol").read_text() == "requeue 12345\n"


# ------------------------------------------------------------- 9. every user-supplied string in HTML is escaped
def test_report_gallery_escapes_every_string_of_a_tampered_predictions_file(tmp_path):
    """A predictions file is user input: its verdict, image name, explanation, phrases and error must never
    become markup in report.html (a tampered verdict used to be written as is)."""
    from html.parser import HTMLParser

    from legion.eval.ground_truth import read_predictions
    from legion.gallery import GalleryItem, Table, write_report
    from legion.record import PredictionRecord

    evil = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    # the reader refuses a verdict that is not one of fake / real / error ...
    pred = _write_jsonl(tmp_path / "p" / "predictions.jsonl", [_prediction("a.png", verdict=evil)])
    with pytest.raises(ValueError, match="verdict"):
        read_predictions(pred)
    # ... and whatever reaches the gallery (records built in code, other fields) is escaped
    image = np.zeros((8, 8, 3), np.uint8)
    records = [
        PredictionRecord(image=evil, verdict=evil, explanation=f"the {evil} part", phrases=[evil], fake_prob=0.9),
        PredictionRecord(image=evil, verdict="fake", explanation=f"the {evil} part", phrases=[evil, "missing"]),
        PredictionRecord(image=evil, verdict="error", error=evil),
        PredictionRecord(image=evil, verdict="real", explanation=evil),
    ]
    items = [GalleryItem(image, r, [], None, title=evil) for r in records]
    page, _ = write_report(tmp_path / "report", evil, [Table(evil, [{evil: evil}], note=evil)], items, intro=evil)

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags = []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))

    parser = Tags()
    parser.feed(page.read_text())
    assert not [t for t, _ in parser.tags if t == "script"]
    assert not [(t, a) for t, a in parser.tags if any(k.startswith("on") for k in a)]
    assert all(a["src"].startswith("report_assets/") for t, a in parser.tags if t == "img")
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.read_text()  # shown as text
