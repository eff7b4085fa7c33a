"""legion infer: listing, batched grounded generation -> records, writers, resume, sharding, gate."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from legion.config import ConfigError
from legion.errors import MissingDependencyError
from legion.infer import (
    SUMMARY,
    Analyzer,
    AnalyzerConfig,
    InferConfig,
    InferError,
    list_images,
    output_subdir,
    read_records,
    run_inference,
)
from legion.model import conversation as conv
from legion.model.quantization import quantize_language_model
from legion.record import RECORD_FIELDS, PredictionRecord
from legion.utils.rle import rle_to_mask

REPO = Path(__file__).resolve().parents[1]


class ScriptedAnswers:
    """Forward hook on lm_head that makes greedy decoding emit a given token sequence per batch row
    (then eos). The [SEG] hidden states, SAM masks and text parsing all stay the real code path:
    random tiny weights would almost never emit [SEG] on their own."""

    def __init__(self, model, tokenizer, answers: list[str]):
        self.rows = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
        self.eos = model.config.eos_token_id
        self.step = 0
        self.hooks = [
            model.lm_head.register_forward_hook(self),
            model.model.register_forward_pre_hook(self._new_prompt, with_kwargs=True),
        ]

    def _new_prompt(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:  # a prompt forward starts a new generation
            self.step = 0

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def __call__(self, module, inputs, output):
        if output.dim() != 2:  # teacher-forced forwards are left alone
            return output
        output = output.clone()
        for b in range(output.shape[0]):
            row = self.rows[b % len(self.rows)]
            token = row[self.step] if self.step < len(row) else self.eos
            output[b, token] += 1e4
        self.step += 1
        return output


def _images():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        rng.integers(0, 256, (70, 30, 3), dtype=np.uint8),
        rng.integers(0, 256, (33, 33, 3), dtype=np.uint8),
    ]


def _write_folder(root: Path) -> list[str]:
    (root / "sub").mkdir(parents=True)
    names = ["b.png", "a.jpg", "sub/c.png"]
    for name, image in zip(names, _images()):
        Image.fromarray(image).save(root / name)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"x")
    (root / "zz_broken.png").write_bytes(b"not a png")
    return names


def test_list_images_folder_and_list_file(tmp_path):
    _write_folder(tmp_path / "imgs")
    listing = list_images(str(tmp_path / "imgs"))
    assert [k for k, _ in listing.items] == ["a.jpg", "b.png", "sub/c.png", "zz_broken.png"]
    assert listing.skipped_non_images == 1 and listing.skipped_examples == ["notes.txt"]
    (tmp_path / "list.txt").write_text("# chosen\nsub/c.png\n\na.jpg\nreadme.md\na.jpg\nmissing.png\n")
    listing = list_images(str(tmp_path / "imgs"), str(tmp_path / "list.txt"))
    assert [k for k, _ in listing.items] == ["sub/c.png", "a.jpg", "missing.png"]  # list order, no duplicates
    assert listing.skipped_non_images == 1
    with pytest.raises(InferError, match="not a directory"):
        list_images(str(tmp_path / "nope"))


def test_output_subdir_stays_inside_output_dir(tmp_path):
    assert output_subdir(tmp_path, "sub/x.png") == tmp_path / "sub" / "x.png"
    for key in ("../../etc/x.png", "/abs/x.png"):
        sub = output_subdir(tmp_path, key)
        assert sub.parent == tmp_path and sub.name.endswith("x.png")


def test_scripted_answers_pair_phrases_seg_and_masks(tiny_model):
    model, tokenizer = tiny_model
    answers = [
        f"Here {conv.tag_phrase('the hand')} and {conv.tag_phrase('the sky')}.",
        "no artifacts at all.",
        f"odd {conv.tag_phrase('a door')} and <p> a wall </p> only.",
    ]
    analyzer = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=40)
    images = _images()
    script = ScriptedAnswers(model, tokenizer, answers)
    typed = analyzer.analyze(images)
    script.remove()
    assert all(isinstance(r, PredictionRecord) and r.image is None for r in typed)
    records = [r.to_json() for r in typed]  # exactly what predictions.jsonl gets, less the image key

    two, none, odd = records
    assert set(RECORD_FIELDS) - {"image"} == set(two)
    assert two["verdict"] == "fake" and two["fake_prob"] is None and two["error"] is None
    assert two["phrases"] == ["the hand", "the sky"] and two["num_seg"] == 2 and len(two["masks"]) == 2
    assert two["explanation"] == "Here the hand and the sky ." and "[SEG]" in two["raw_text"]
    assert not two["no_seg"] and two["mismatch"] is None and not two["truncated"]
    masks = [rle_to_mask(r) for r in two["masks"]]
    assert all(m.shape == (40, 56) for m in masks) and two["width"] == 56 and two["height"] == 40
    np.testing.assert_array_equal(rle_to_mask(two["union_mask"]), np.logical_or(*masks).astype(np.uint8))
    assert two["sam_input_size"] == model.config.sam_config["image_size"]
    # no [SEG]: recorded as such, an explained empty union, no phantom mask
    assert none["no_seg"] and none["masks"] == [] and none["phrases"] == [] and none["mismatch"] is None
    assert rle_to_mask(none["union_mask"]).shape == (70, 30) and rle_to_mask(none["union_mask"]).sum() == 0
    # a phrase without [SEG]: pairing broken -> flagged
    assert odd["phrases"] == ["a door", "a wall"] and odd["num_seg"] == 1 and len(odd["masks"]) == 1
    assert odd["mismatch"] == "2 phrases, 1 [SEG], 1 masks"

    # the batch gives exactly what one-by-one generation gives (left padding, per-row [SEG] states)
    for i, image in enumerate(images):
        script = ScriptedAnswers(model, tokenizer, [answers[i]])
        single = analyzer.analyze([image])[0]
        script.remove()
        assert single.raw_text == records[i]["raw_text"] and single.masks == records[i]["masks"]

    # the static-cache decoding (the one a CUDA graph replays on GPUs) gives the same records
    static = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=40, decoding="static")
    script = ScriptedAnswers(model, tokenizer, answers)
    static_records = static.analyze(images)
    script.remove()
    assert [(r.raw_text, r.masks) for r in static_records] == [(r["raw_text"], r["masks"]) for r in records]


def test_sam_input_size_checked(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ConfigError, match="decoding must be one of"):
        Analyzer(model, tokenizer, sam_input_size=64, decoding="graph")
    with pytest.raises(ConfigError, match="exceeds the SAM encoder input"):
        Analyzer(model, tokenizer, sam_input_size=1024)
    assert Analyzer(model, tokenizer, sam_input_size=64).sam_input_size == 64


def _cfg(tmp_path, **kw):
    base = dict(
        image_dir=str(tmp_path / "imgs"),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=6,
        sam_input_size=None,
        batch_size=2,
        progress=False,
    )
    base.update(kw)
    return InferConfig(**base)


def test_run_folder_writes_records_files_and_resumes(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    _write_folder(tmp_path / "imgs")
    analyzer = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=12)
    cfg = _cfg(tmp_path, save_reference_layout=True, save_phrase_masks=True, save_overlay=True)
    script = ScriptedAnswers(model, tokenizer, [f"see {conv.tag_phrase('it')}."])
    summary = run_inference(cfg, analyzer)
    script.remove()
    out = tmp_path / "out"
    records = read_records(out / "predictions.jsonl")
    assert [r["image"] for r in records] == ["a.jpg", "b.png", "sub/c.png", "zz_broken.png"]
    assert summary["skipped_non_images"] == 1 and summary["error"] == 1 and summary["fake"] == 3
    broken = records[-1]
    assert broken["verdict"] == "error" and "zz_broken.png" in broken["error"] and broken["masks"] == []
    for r in records[:3]:
        assert list(r) == list(RECORD_FIELDS) and r["phrases"] == ["it"] and len(r["masks"]) == 1
        sub = out / r["image"]
        explanation = json.loads((sub / "explanation.json").read_text())
        assert explanation == {f"{tmp_path / 'imgs'}/{r['image']}": r["explanation"]}
        union = Image.open(sub / "mask.png")
        assert union.mode == "L" and union.size == (r["width"], r["height"])
        assert set(np.unique(np.asarray(union))) <= {0, 255}
        np.testing.assert_array_equal(np.asarray(union) // 255, rle_to_mask(r["union_mask"]))
        assert (sub / "mask_0.png").is_file() and Image.open(sub / "overlay.png").mode == "RGB"
    assert (out / "infer_config.yaml").is_file() and not list(out.glob("predictions.part*"))

    # resume: nothing recomputed except the error and an image whose files went missing
    (out / "b.png" / "mask.png").unlink()
    before = {r["image"]: r for r in records}
    summary = run_inference(cfg, analyzer)  # no script now: b.png's new text differs
    assert summary["resumed"] == 2
    again = {r["image"]: r for r in read_records(out / "predictions.jsonl")}
    assert list(again) == list(before)
    assert again["a.jpg"] == before["a.jpg"] and again["sub/c.png"] == before["sub/c.png"]
    assert again["b.png"]["raw_text"] != before["b.png"]["raw_text"] and (out / "b.png" / "mask.png").is_file()


def test_sharding_loses_and_duplicates_nothing(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    _write_folder(tmp_path / "imgs")
    analyzer = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=3)
    cfg = _cfg(tmp_path, max_new_tokens=3)
    for rank in (2, 1):
        s = run_inference(cfg, analyzer, rank=rank, world_size=3)
        assert "records" not in s
    assert len(list((tmp_path / "out").glob("predictions.part*"))) == 2
    summary = run_inference(cfg, analyzer, rank=0, world_size=3)
    assert summary["this_rank"] == 2 and summary["records"] == 4
    keys = [r["image"] for r in read_records(tmp_path / "out" / "predictions.jsonl")]
    assert keys == ["a.jpg", "b.png", "sub/c.png", "zz_broken.png"]


def test_detector_gate(tiny_model, tiny_model_dir, tmp_path):
    from legion.model.detector import build_detector, load_detector

    model, tokenizer = tiny_model
    build_detector(tiny_model_dir, seed=0).save(tmp_path / "det")
    detector = load_detector(tmp_path / "det")
    images = _images()[:2]
    probs = detector.fake_probability_images(images)
    gate = Analyzer(
        model, tokenizer, detector=detector, sam_input_size=None, max_new_tokens=4, gate_threshold=max(probs) + 1e-3
    )
    for record, prob in zip(gate.analyze(images), probs):
        assert record.verdict == "real" and record.fake_prob == pytest.approx(prob)
        assert record.explanation == "" and record.masks == [] and record.raw_text is None
    open_gate = Analyzer(
        model, tokenizer, detector=detector, sam_input_size=None, max_new_tokens=4, gate_threshold=min(probs) - 1e-3
    )
    for record, prob in zip(open_gate.analyze(images), probs):
        assert record.verdict == "fake" and record.fake_prob == pytest.approx(prob)
        assert record.raw_text is not None


def test_cli_errors_and_config(tmp_path, capsys, tiny_model_dir):
    from legion.cli import main

    out = tmp_path / "y"
    assert main(["infer", "--config", str(REPO / "configs/tiny/infer.yaml"), "image_dir=x", f"output_dir={out}"]) == 2
    assert "model_path" in capsys.readouterr().err
    assert not out.exists()  # a usage error writes nothing
    for bad in ("num_workers=-1", "batch_size=0", "perturb=jpeg:500"):
        argv = ["infer", f"model_path={tiny_model_dir}", f"image_dir={tmp_path}", f"output_dir={out}", bad]
        assert main(argv) == 2
        assert bad.split("=")[0] in capsys.readouterr().err and not out.exists(), bad
    assert main(["infer", "batch_sise=3"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert (
        main(["infer", f"output_dir={tmp_path}", f"image_dir={tmp_path}", f"model_path={tmp_path}", "perturb=jpeg:500"])
        == 2
    )
    assert "JPEG quality" in capsys.readouterr().err


def test_image_and_shard_usage_errors_write_nothing(tmp_path, capsys, tiny_model, tiny_model_dir):
    """A missing or bad image source, a negative max_images and a rank outside the world size fail before
    run_info.json (or the output folder) is written."""
    from legion.cli import main

    out = tmp_path / "out"
    base = ["infer", f"model_path={tiny_model_dir}", f"output_dir={out}"]
    for extra, message in (
        ([], "give image_dir=FOLDER or image_list=FILE"),
        ([f"image_dir={tmp_path / 'nope'}"], "image_dir is not a directory"),
        ([f"image_list={tmp_path / 'nope.txt'}"], "image_list not found"),
        ([f"image_dir={tmp_path}", "max_images=-1"], "max_images must be >= 0"),
    ):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists(), extra
    _write_folder(tmp_path / "imgs")
    analyzer = Analyzer(*tiny_model, sam_input_size=None, max_new_tokens=3)
    with pytest.raises(ConfigError, match="rank 0 is outside world size 0"):
        run_inference(_cfg(tmp_path), analyzer, rank=0, world_size=0)
    assert not out.exists()


def test_cli_end_to_end_with_perturbation(tiny_model_dir, tmp_path, capsys):
    from legion.cli import main

    _write_folder(tmp_path / "imgs")
    code = main(
        [
            "infer",
            "--config",
            str(REPO / "configs/tiny/infer.yaml"),
            f"model_path={tiny_model_dir}",
            f"image_dir={tmp_path / 'imgs'}",
            f"output_dir={tmp_path / 'out'}",
            "max_new_tokens=3",
            "perturb=jpeg:50",
            "progress=false",
            "save_overlay=false",
        ]
    )
    assert code == 0
    assert "4 images" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "infer_summary.json").read_text())
    assert summary["perturbation"]["kind"] == "jpeg" and summary["perturbation"]["quality"] == 50
    assert "perturb: jpeg:50" in (tmp_path / "out" / "infer_config.yaml").read_text()
    assert len(read_records(tmp_path / "out" / "predictions.jsonl")) == 4


def test_quantization_needs_bitsandbytes(tiny_model):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes installed: the error path cannot be exercised")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        quantize_language_model(tiny_model[0], "8bit", torch.float32)
    with pytest.raises(ConfigError, match="not one of 8bit, 4bit"):
        quantize_language_model(tiny_model[0], "3bit", torch.float32)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_llm_runs(tiny_model_dir, mode):
    pytest.importorskip("bitsandbytes")
    analyzer = Analyzer.from_config(
        AnalyzerConfig(
            model_path=str(tiny_model_dir), device="cpu", sam_input_size=None, max_new_tokens=4, quantization=mode
        )
    )
    layer = analyzer.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear8bitLt" if mode == "8bit" else "Linear4bit")
    assert layer.weight.dtype in (torch.int8, torch.uint8)
    record = analyzer.analyze(_images()[:1])[0]
    assert record.verdict == "fake" and record.error is None


def test_dtype_policy_reference_casts_sam_and_fcs_too(tiny_model_dir):
    """reference: the whole model in bf16 like the released infer.py; fp32_grounding: SAM + fcs stay fp32."""
    answers = [f"I found {conv.tag_phrase('the hand')}."]
    records = {}
    for policy in ("reference", "fp32_grounding"):
        cfg = AnalyzerConfig(
            model_path=str(tiny_model_dir), device="cpu", dtype="bfloat16", sam_input_size=None, max_new_tokens=12
        )
        analyzer = Analyzer.from_config(dataclasses.replace(cfg, dtype_policy=policy))
        grounding = analyzer.model.model.grounding_encoder
        expected = torch.bfloat16 if policy == "reference" else torch.float32
        assert grounding.mask_decoder.iou_token.weight.dtype == expected
        assert grounding.image_encoder.patch_embed.proj.weight.dtype == expected
        assert analyzer.model.model.text_hidden_fcs[0][0].weight.dtype == expected
        assert analyzer.model.lm_head.weight.dtype == torch.bfloat16
        script = ScriptedAnswers(analyzer.model, analyzer.tokenizer, answers)
        records[policy] = analyzer.analyze(_images()[:1])[0].to_json()
        script.remove()
    ref, ours = records["reference"], records["fp32_grounding"]
    assert ref["phrases"] == ours["phrases"] == ["the hand"] and ref["error"] is None
    a, b = rle_to_mask(ref["masks"][0]).astype(bool), rle_to_mask(ours["masks"][0]).astype(bool)
    assert a.shape == b.shape == (40, 56)
    with pytest.raises(ConfigError, match="dtype_policy"):
        Analyzer.from_config(AnalyzerConfig(model_path=str(tiny_model_dir), device="cpu", dtype_policy="mixed"))


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_model_dir, tmp_path):
    _write_folder(tmp_path / "imgs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29700 + os.getpid() % 200),
        "-m",
        "legion",
        "infer",
        "--config",
        "configs/tiny/infer.yaml",
        f"model_path={tiny_model_dir}",
        f"image_dir={tmp_path / 'imgs'}",
        f"output_dir={tmp_path / 'out'}",
        "max_new_tokens=3",
        "progress=false",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = [r["image"] for r in read_records(tmp_path / "out" / "predictions.jsonl")]
    assert keys == ["a.jpg", "b.png", "sub/c.png", "zz_broken.png"]
    assert not list((tmp_path / "out").glob("predictions.part*"))


def test_fused_projections_and_attention_backend_keep_the_records(tiny_model_dir):
    """fused_projections / attention_backend (issue 21): the same records as the defaults; bad names fail early."""
    from legion.model.fused_projections import projections_fused

    answers = [f"I found {conv.tag_phrase('the hand')} and {conv.tag_phrase('the sky')}."]
    records = {}
    for name, extra in {
        "default": {},
        "fused": {"fused_projections": True},
        "math": {"attention_backend": "math"},
        "torch": {"attention_backend": "torch"},
    }.items():
        cfg = AnalyzerConfig(
            model_path=str(tiny_model_dir), device="cpu", sam_input_size=None, max_new_tokens=16, **extra
        )
        analyzer = Analyzer.from_config(cfg)
        assert projections_fused(analyzer.model.model) == (name == "fused")
        script = ScriptedAnswers(analyzer.model, analyzer.tokenizer, answers)
        records[name] = [r.to_json() for r in analyzer.analyze(_images()[:2])]
        script.remove()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert all(len(r["masks"]) == 2 for r in records["default"])
    for name in ("fused", "math", "torch"):
        assert strip(records[name]) == strip(records["default"]), name
    with pytest.raises(ConfigError, match="attention_backend"):
        Analyzer.from_config(AnalyzerConfig(model_path=str(tiny_model_dir), device="cpu", attention_backend="fast"))


@pytest.mark.parametrize("perturb", [None, "noise:5"])
def test_loader_workers_give_the_same_records_and_files(tiny_model, tmp_path, perturb):
    """num_workers > 0 (read + perturb + preprocess in DataLoader processes, outputs written on a background
    thread) writes the same predictions.jsonl (but `seconds`) and the same files as the in-order path."""
    model, tokenizer = tiny_model
    _write_folder(tmp_path / "imgs")
    analyzer = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=12)
    outputs = {}
    for workers in (0, 1, 3):
        cfg = _cfg(
            tmp_path,
            output_dir=str(tmp_path / f"out{workers}"),
            num_workers=workers,
            save_reference_layout=True,
            save_phrase_masks=True,
            save_overlay=True,
            perturb=perturb,
        )
        script = ScriptedAnswers(model, tokenizer, [f"see {conv.tag_phrase('it')}.", "nothing here."])
        summary = run_inference(cfg, analyzer)
        script.remove()
        out = tmp_path / f"out{workers}"
        lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        files = {
            p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("predictions.jsonl", "infer_config.yaml", "run_info.json", SUMMARY)
        }
        for line in lines:
            line.pop("seconds")
        outputs[workers] = (lines, files, {k: v for k, v in summary.items() if k != "output_dir"})
    assert outputs[0][0][0]["masks"] and outputs[0][0][-1]["verdict"] == "error"
    assert outputs[1] == outputs[0] and outputs[3] == outputs[0]


def test_ordered_writer_runs_jobs_in_order_and_raises_their_errors():
    from legion.infer import OrderedWriter

    for background in (False, True):
        done = []
        writer = OrderedWriter(background)
        for i in range(5):
            writer.submit(done.append, i)
        writer.close()
        assert done == list(range(5))

        def fail(_):
            raise OSError("disk full")

        writer = OrderedWriter(background)
        with pytest.raises(OSError, match="disk full"):
            writer.submit(fail, 0)
            writer.close()


def test_prepared_batches_give_the_same_records(tiny_model):
    """Analyzer.analyze(images, prepared) with the loader's preprocessing = analyze(images); a gated subset or the
    per-image retry selects the matching rows."""
    model, tokenizer = tiny_model
    analyzer = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=8)
    images = _images()
    prepared = analyzer.preprocessor(images)
    assert prepared.clip.shape[0] == prepared.sam.shape[0] == 3 and len(prepared.sam_sizes) == 3
    plain = [r.to_json() for r in analyzer.analyze(images)]
    with_prepared = [r.to_json() for r in analyzer.analyze(images, prepared)]
    subset = [r.to_json() for r in analyzer.analyze(images[1:], prepared.select([1, 2]))]
    for rows in (plain, with_prepared, subset):
        for row in rows:
            row.pop("seconds")
    assert with_prepared == plain and subset == plain[1:]
