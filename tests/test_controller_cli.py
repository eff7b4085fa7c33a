"""`legion regenerate` / `legion inpaint` from the command line: tiny configs, a saved tiny pipeline
directory, the remote reviser against a local HTTP server, and clear errors on bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from legion.cli import main
from legion.controller.pipelines import save_tiny_pipeline
from tests.test_controller_reviser import FakeChatServer


def _answer(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_help_lists_the_config_keys(capsys):
    for command, own_key in (("regenerate", "reviser.backend"), ("inpaint", "dilation.kernel")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "config keys:" in out and "scorer.kind" in out and own_key in out


def test_regenerate_cli_with_a_pipeline_directory_and_a_remote_reviser(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pipeline_dir = save_tiny_pipeline("text2img", tmp_path / "sd_tiny")
    (tmp_path / "prompts.txt").write_text("a red apple\n")
    with FakeChatServer([(200, _answer("a shiny red apple on a wooden table"))]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
        code = main(
            [
                "regenerate",
                "--config",
                "configs/tiny/regenerate.yaml",
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--output-dir",
                str(tmp_path / "out"),
                f"legion.model_path={tiny_model_dir}",
                f"generator.path={pipeline_dir}",
                "reviser.backend=openai",
                "reviser.retries=0",
                "max_rounds=2",
                "patience=0",
                "stop_on_clean=false",
            ]
        )
    assert code == 0
    assert len(server.requests) == 1 and server.requests[0]["auth"] == "Bearer sk-local"
    (summary,) = [json.loads(line) for line in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert summary["case_id"] == "prompt_0001" and summary["num_rounds"] == 2
    assert [r["prompt"] for r in summary["rounds"]] == ["a red apple", "a shiny red apple on a wooden table"]
    assert (tmp_path / "out" / "cases" / "prompt_0001" / "round_01" / "image.png").is_file()
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "index.html").is_file()
    run_info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert run_info["command"] == "regenerate" and run_info["status"] == "done"
    assert "mean of per-image ratios" in capsys.readouterr().out


def test_inpaint_cli_on_a_mapping(tiny_model_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (36, 44, 3), dtype=np.uint8)).save(images / "x.png")
    (tmp_path / "in.json").write_text(json.dumps({"x.png": "a street at night"}))
    code = main(
        [
            "inpaint",
            "--config",
            "configs/tiny/inpaint.yaml",
            "--inputs",
            str(tmp_path / "in.json"),
            "--image-root",
            str(images),
            "--output-dir",
            str(tmp_path / "out"),
            f"legion.model_path={tiny_model_dir}",
        ]
    )
    assert code == 0
    (summary,) = [json.loads(line) for line in (tmp_path / "out" / "summary.jsonl").read_text().splitlines()]
    assert summary["case_id"] == "x" and summary["prompt"] == "a street at night"
    assert summary["stop_reason"] in {"no_artifact", "max_iter"}
    first = np.asarray(Image.open(tmp_path / "out" / summary["rounds"][0]["image"]))
    assert first.shape == (36, 44, 3)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["command"] == "inpaint" and scores["n"] == 1
    run_info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert run_info["command"] == "inpaint" and run_info["status"] == "done"


@pytest.mark.parametrize(
    "argv, message, exit_code",
    [
        (["regenerate", "--config", "configs/tiny/regenerate.yaml"], "no input", 2),
        (
            ["regenerate", "--config", "configs/tiny/regenerate.yaml", "--prompts", "{tmp}/p.txt", "max_round=2"],
            "did you mean 'max_rounds'",
            2,
        ),
        (
            [
                "regenerate",
                "--config",
                "configs/tiny/regenerate.yaml",
                "--prompts",
                "{tmp}/p.txt",
                "--output-dir",
                "{tmp}/o",
                "generator.path={tmp}/no_pipeline",
            ],
            "model_index.json",
            1,  # loaders report failed work
        ),
        (
            [
                "regenerate",
                "--config",
                "configs/tiny/regenerate.yaml",
                "--prompts",
                "{tmp}/p.txt",
                "--output-dir",
                "{tmp}/o",
                "scorer.kind=hps_v2.1",
                "scorer.checkpoint={tmp}/HPS_v2.1_compressed.pt",
            ],
            "HPS v2.1 checkpoint not found",
            1,
        ),
        (["inpaint", "--config", "configs/tiny/inpaint.yaml", "--inputs", "{tmp}/p.txt"], "has no 'image'", 2),
        (
            ["inpaint", "--config", "configs/tiny/inpaint.yaml", "--inputs", "{tmp}/m.json", "dilation.kernel=0"],
            "kernel >= 1",
            2,
        ),
    ],
)
def test_cli_errors_are_clear(argv, message, exit_code, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"a.png": "a cat"}))
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == exit_code
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"legion {argv[0]}: error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "setting, message", [("max_iter=-1", "max_iter must be >= 0"), ("dilation.kernel=0", "kernel >= 1")]
)
def test_bad_loop_settings_stop_before_anything_is_loaded_or_written(setting, message, tmp_path, monkeypatch, capsys):
    from legion.controller import inpaint

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the settings were checked")

    for loader in ("build_scorer", "load_inpainter", "load_analyzer"):
        monkeypatch.setattr(inpaint, loader, must_not_load)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.json").write_text(json.dumps({"a.png": "a cat"}))
    out = tmp_path / "out"
    argv = ["inpaint", "--config", "configs/tiny/inpaint.yaml", "--inputs", str(tmp_path / "m.json")]
    code = main([*argv, "--output-dir", str(out), setting])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("legion inpaint: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # no config.yaml, no run_info.json
