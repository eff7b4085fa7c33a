"""Hugging Face side: Auto classes after `import legion`, exports (bf16, shards, card), Hub ids, `legion export`,
and the Python API `legion.load(...).analyze(...)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import legion
from legion.cli import main
from legion.errors import InputNotFoundError, OptionError, UsageError
from legion.infer import InferConfig, run_inference
from legion.model import conversation as conv
from legion.model.builders import load_model, save_model
from legion.model.export import parse_size, resolve_model_source
from tests.test_infer import ScriptedAnswers

REPO = Path(__file__).resolve().parents[1]


def test_auto_classes_in_a_fresh_process_load_a_complete_model(tiny_model_dir):
    """`import legion` registers model_type "legion"; the CLIP tower comes back with the files' weights."""
    code = f"""
import json, legion, transformers, torch
from safetensors.torch import load_file
d = {str(tiny_model_dir)!r}
config = transformers.AutoConfig.from_pretrained(d)
model = transformers.AutoModelForCausalLM.from_pretrained(d)
clip = load_file(d + "/vision_tower/model.safetensors")
tower = model.model.vision_tower.vision_tower.state_dict()
same = all(torch.equal(tower[k.removeprefix("vision_model.")] if k.removeprefix("vision_model.") in tower
                       else tower[k], v.to(tower[k.removeprefix("vision_model.")].dtype)) for k, v in clip.items()
           if k.removeprefix("vision_model.") in tower or k in tower)
meta = any(p.is_meta for p in model.parameters())
print(json.dumps([type(config).__name__, type(model).__name__, str(model.dtype), same, meta, len(clip)]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    config_cls, model_cls, dtype, same, meta, n_clip = json.loads(out.stdout.strip().splitlines()[-1])
    assert (config_cls, model_cls, dtype) == ("LegionConfig", "LegionForCausalLM", "torch.bfloat16")
    assert same and not meta and n_clip > 10


def test_from_pretrained_refuses_what_it_would_ignore(tiny_model_dir):
    from legion.model.legion import LegionForCausalLM

    with pytest.raises(ValueError, match="remote code"):
        LegionForCausalLM.from_pretrained(tiny_model_dir, trust_remote_code=True)
    with pytest.raises(TypeError, match="quantization_config"):
        LegionForCausalLM.from_pretrained(tiny_model_dir, quantization_config={"load_in_8bit": True})
    with pytest.raises(TypeError, match="output_loading_info"):  # we return the model only, never (model, info)
        LegionForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    model = LegionForCausalLM.from_pretrained(tiny_model_dir, dtype="float32", device_map="cpu")
    assert model.dtype == torch.float32 and not model.training


def test_export_is_bf16_sharded_with_a_card_and_loads_back(tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_model(tiny_model_dir, verbose=False)
    out = save_model(model, tokenizer, tmp_path / "exp", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    # a shard holds at most 200 kB of tensors, unless one tensor alone is larger
    assert len(shards) > 2 and all((out / s).stat().st_size <= 210_000 or len(per_shard[s]) == 1 for s in shards)
    assert not (out / "model.safetensors").exists()
    dtypes = {}
    for shard in shards:
        with safe_open(str(out / shard), "pt") as fh:
            dtypes.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["model.mm_projector.0.weight"] == "BF16"
    assert dtypes["model.text_hidden_fcs.0.0.weight"] == "F32"
    assert load_file(str(out / "vision_tower" / "model.safetensors")).popitem()[1].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["do_sample"] is False
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "library_name: legion" in card
    assert "legion.load(" in card and "AutoModelForCausalLM" in card
    again, _, report = load_model(out, verbose=False)
    assert report.ok and len(report.weight_files) == len(shards)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())
    # a re-export into the same folder leaves no stale shard behind
    save_model(model, tokenizer, out)
    assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    with pytest.raises(OptionError):
        parse_size("five")


def test_an_export_dtype_is_checked_before_anything_is_written(tiny_model_dir, tmp_path):
    model, _, _ = load_model(tiny_model_dir, verbose=False)
    with pytest.raises(OptionError, match="bfloat16, float32, got 'float16'"):
        model.save_pretrained(tmp_path / "m", dtype="float16")  # writes straight into the folder
    assert not (tmp_path / "m").exists()  # no vision_tower/ left behind


def test_model_sources_local_checkpoints_hub_and_offline(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model_source(tiny_model_dir) == Path(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "checkpoints" / "legion_tiny")
    assert resolve_model_source("legion_tiny") == Path("checkpoints/legion_tiny")
    with pytest.raises(InputNotFoundError, match="org/name"):
        resolve_model_source("legion_7b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputNotFoundError, match="hf download khr0516/legion_LE"):
        resolve_model_source("khr0516/legion_LE")
    # online: the Hub (the outside world, stood in for here) is asked for a snapshot of exactly that id
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(tmp_path))
    assert resolve_model_source("khr0516/legion_LE") == tmp_path and asked == ["khr0516/legion_LE"]


def test_legion_export_command_and_push(tiny_model_dir, tmp_path, monkeypatch, capsys):
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"kind": "localization", "dataset": "synthscars", "overall": {"miou": 55.5}}))
    out = tmp_path / "exp"
    assert main(["export", str(tiny_model_dir), "--output-dir", str(out), "--metrics", str(metrics)]) == 0
    assert "synthscars miou" in (out / "README.md").read_text() and "55.5" in (out / "README.md").read_text()
    assert main(["export", str(tiny_model_dir)]) == 2
    assert "--push-to-hub" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(tiny_model_dir), "--push-to-hub", "me/legion-tiny"]) == 2
    assert "needs the network" in capsys.readouterr().err
    # online: what would be uploaded (the Hub API is the outside world, stood in for here)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["repo"] = (repo_id, kwargs["private"])

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["export", str(tiny_model_dir), "--push-to-hub", "me/legion-tiny", "--private"]) == 0
    assert calls["repo"] == ("me/legion-tiny", True)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.model", "vision_tower"} <= set(calls["files"])


def test_save_pretrained_pushes_to_the_hub_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    """push_to_hub=True uploads the written folder (legion.model.export.push_to_hub) instead of being ignored."""
    import huggingface_hub

    from legion.model.legion import LegionForCausalLM

    model = LegionForCausalLM.from_pretrained(tiny_model_dir, dtype="float32", device_map="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="needs the network"):
        model.save_pretrained(tmp_path / "offline", push_to_hub=True, repo_id="me/legion-tiny")
    # online: what would be uploaded (the Hub API is the outside world, stood in for here)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append((repo_id, kwargs["private"]))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(sorted(p.name for p in Path(folder_path).iterdir()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model.save_pretrained(tmp_path / "online", push_to_hub=True, repo_id="me/legion-tiny", private=True)
    assert calls[0] == ("me/legion-tiny", True) and {"config.json", "model.safetensors"} <= set(calls[1])
    with pytest.raises(OptionError, match="user/name"):  # the default repo_id, the folder's name, has no user
        model.save_pretrained(tmp_path / "legion-tiny", push_to_hub=True)
    model.save_pretrained(tmp_path / "not_pushed", push_to_hub=False, repo_id="me/legion-tiny")
    assert len(calls) == 2 and (tmp_path / "not_pushed" / "config.json").is_file()


def test_python_api_matches_legion_infer(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 56, 3), (33, 47, 3), (64, 30, 3)]]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    analyzer = legion.load(tiny_model_dir, device="cpu", dtype="float32", max_new_tokens=24, sam_input_size=None)
    model, tokenizer = analyzer.analyzer.model, analyzer.analyzer.tokenizer
    answer = f"I found {conv.tag_phrase('the hand')} and {conv.tag_phrase('a cup')}."

    script = ScriptedAnswers(model, tokenizer, [answer])
    single = analyzer.analyze(folder / "0.png")
    results = analyzer.analyze([folder / "0.png", Image.fromarray(images[1]), images[2]])
    script.remove()
    assert single.verdict == "fake" and single.phrases == ["the hand", "a cup"]
    for result, image in zip(results, images):
        assert len(result.masks) == 2 and all(m.dtype == bool and m.shape == image.shape[:2] for m in result.masks)
        np.testing.assert_array_equal(result.union_mask, result.masks[0] | result.masks[1])
        assert result.overlay().size == (image.shape[1], image.shape[0])
    with pytest.raises(OptionError, match="numpy image"):
        analyzer.analyze(np.zeros((4, 4, 4), np.float32))

    script = ScriptedAnswers(model, tokenizer, [answer])
    run_inference(
        InferConfig(image_dir=str(folder), output_dir=str(tmp_path / "out"), progress=False), analyzer.analyzer
    )
    script.remove()
    written = {json.loads(line)["image"]: json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").open()}

    def comparable(record):
        return {k: v for k, v in record.items() if k not in ("image", "seconds")}

    for i, result in enumerate(results):
        assert comparable(result.to_json()) == comparable(written[f"{i}.png"])


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "L", "CMYK"])
def test_a_pil_image_gives_the_pixels_its_file_gives(tmp_path, mode):
    """analyze(PIL image) and analyze(path) see the same pixels, 16-bit images included (high byte)."""
    from legion.api import to_rgb_array

    rng = np.random.default_rng(3)
    if mode == "I;16":
        picture = Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16))
    else:
        picture = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    picture.save(path)
    from_file = to_rgb_array(path)
    from_pil = to_rgb_array(Image.open(path))
    assert from_pil.dtype == np.uint8 and from_pil.shape == (9, 7, 3) and from_pil.flags.writeable
    assert (from_pil == from_file).all()


def test_a_pil_image_of_a_mode_files_are_refused_in_is_refused():
    from legion.api import to_rgb_array

    with pytest.raises(OptionError, match="unsupported pixel mode 'F'"):
        to_rgb_array(Image.fromarray(np.zeros((4, 4), np.float32)))
