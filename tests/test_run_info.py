"""run_info.json: every recipe records where its result came from (code, packages, machine, command, times)."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from legion.errors import OptionError
from legion.infer import Analyzer, InferConfig, run_inference
from legion.utils.run_info import RunRecord, git_state


def test_record_lifecycle(tmp_path):
    with RunRecord(tmp_path / "a", "demo-command", extra_fact=3) as record:
        running = json.loads((tmp_path / "a" / "run_info.json").read_text())
        assert running["status"] == "running" and running["extra_fact"] == 3 and running["end"] is None
        record.update(images=7)
    done = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert done["status"] == "done" and done["images"] == 7 and done["seconds"] >= 0 and done["end"]
    assert done["packages"]["torch"] and done["python"] and done["command_line"]
    assert done["git"] == git_state()
    with pytest.raises(RuntimeError), RunRecord(tmp_path / "b", "x"):
        raise RuntimeError("boom")
    assert json.loads((tmp_path / "b" / "run_info.json").read_text())["error"] == "RuntimeError: boom"
    # a usage error before anything was written leaves no folder behind
    with pytest.raises(OptionError), RunRecord(tmp_path / "c", "x", eager=False):
        raise OptionError("typo")
    assert not (tmp_path / "c").exists()


def test_a_rank_that_does_not_write_collects_no_provenance(tmp_path, monkeypatch):
    from legion.utils import run_info

    monkeypatch.setattr(run_info, "provenance", lambda: pytest.fail("provenance collected for nothing"))
    with RunRecord(tmp_path / "a", "train", write=False) as record:
        record.update(step=1)
    assert not (tmp_path / "a").exists()


def test_git_state_names_this_checkout():
    state = git_state()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert state["commit"] == head and isinstance(state["dirty"], bool)


def test_infer_and_eval_write_it(tiny_model, tmp_path):
    from legion.cli import main

    model, tokenizer = tiny_model
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "imgs" / "a.png")
    analyzer = Analyzer(model, tokenizer, sam_input_size=None, max_new_tokens=3)
    cfg = InferConfig(image_dir=str(tmp_path / "imgs"), output_dir=str(tmp_path / "out"), progress=False)
    run_inference(cfg, analyzer)
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert info["command"] == "infer" and info["status"] == "done" and info["summary"]["images"] == 1

    gt = tmp_path / "gt" / "test"
    (gt / "annotations").mkdir(parents=True)
    (gt / "images").mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(gt / "images" / "a.png")
    caption = "Upon examining the image. I have found: x.\nTo elaborate, I have found the following artifacts. "
    (gt / "annotations" / "test.json").write_text(
        json.dumps([{"1": {"img_file_name": "a.png", "caption": caption, "refs": []}}])
    )
    args = ["eval", "localization", "--pred", str(tmp_path / "out" / "predictions.jsonl"), "--gt", str(gt.parent)]
    assert main([*args, "--dataset", "synthscars", "--output-dir", str(tmp_path / "ev"), "--no-plots"]) == 0
    assert json.loads((tmp_path / "ev" / "run_info.json").read_text())["command"] == "eval localization"
