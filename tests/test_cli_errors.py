"""Errors reach the user one way (legion/errors.py, legion.cli.main): one line on stderr,
`legion <command>: error: <message>`, exit code 2 when the command cannot start as asked and 1 when
the work failed; LEGION_DEBUG=1 shows the traceback; bugs are never swallowed. Every command is
provoked cheaply here (no model is trained or loaded)."""

import json
from pathlib import Path

import pytest

from legion.cli import COMMANDS, main
from legion.errors import DataError, InputNotFoundError, LegionError, UsageError, one_line

REPO = Path(__file__).resolve().parents[1]

# (argv with {tmp} / {repo} placeholders, exit code, a fragment of the message)
CASES = [
    (["demo", "--output-dir", "{tmp}/a_file"], 2, "not a directory"),
    (["demo", "--output-dir", "{tmp}/demo", "--num-train", "0"], 2, "--num-train"),
    (["make-toy-data", "--output-dir", "{tmp}/toy", "--size", "16"], 2, "too small"),
    (["make-toy-data", "--output-dir", "{tmp}/a_file", "--num-train", "1", "--num-test", "1"], 2, "not a directory"),
    (["make-tiny", "--output-dir", "{tmp}/a_file"], 2, "not a directory"),
    (["inspect", "{tmp}/nope"], 2, "neither a preset"),
    (["inspect", "tiny", "--stored"], 2, "--stored needs --keys"),
    (["inspect", "{tmp}/empty"], 1, "no config.json"),
    (["data", "check", "--root", "{tmp}/nope"], 2, "--root"),
    (["train", "--config", "{repo}/configs/tiny/train_loc_exp.yaml", "optim.lrr=1"], 2, "did you mean 'optim.lr'"),
    (["train", "--config", "{repo}/configs/tiny/train_loc_exp.yaml", "model.path={tmp}/nope"], 2, "model.path"),
    (["train", "--config", "{tmp}/nope.yaml"], 2, "config file not found"),
    (["train", "--config", "{tmp}/bad.yaml"], 2, "not valid YAML"),
    (["merge", "step1", "{tmp}/nope", "--output-dir", "{tmp}/w.safetensors"], 2, "CKPT_DIR"),
    (["merge", "step1", "{tmp}/empty", "--output-dir", "{tmp}/w.safetensors"], 1, "no 'latest' file"),
    (["merge", "step1", "{tmp}/empty", "--tag", "global_step9", "--output-dir", "{tmp}/w.safetensors"], 2, "--tag"),
    (["merge", "step2", "--base", "{tmp}/nope", "--weights", "{tmp}/w", "--output-dir", "{tmp}/m"], 2, "--base"),
    (
        ["merge", "step2", "--base", "{tmp}/empty", "--weights", "{tmp}/a_file", "--output-dir", "{tmp}/m"],
        1,
        "safetensors",
    ),
    (["infer", "batch_sise=3"], 2, "did you mean 'batch_size'"),
    (["infer", "image_dir={tmp}/empty", "output_dir={tmp}/o", "model_path={tmp}/nope"], 2, "model_path"),
    (["infer", "image_dir={tmp}/empty", "output_dir={tmp}/o", "model_path={tmp}/empty"], 1, "no config.json"),
    (
        ["infer", "image_dir={tmp}/empty", "output_dir=o", "model_path={tmp}/empty", "detector_path={tmp}/nope"],
        2,
        "detector",
    ),
    (
        ["eval", "localization", "--pred", "{tmp}/nope", "--gt", "{tmp}", "--dataset", "synthscars"]
        + ["--output-dir", "o"],
        2,
        "--pred",
    ),
    (
        ["eval", "localization", "--pred", "{tmp}/bad.jsonl", "--gt", "{tmp}/empty", "--dataset", "synthscars"]
        + ["--output-dir", "{tmp}/o", "--table-metrics", "miou,nope"],
        2,
        "--table-metrics",
    ),
    (
        ["eval", "localization", "--pred", "{tmp}/bad.jsonl", "--gt", "{tmp}/empty", "--dataset", "synthscars"]
        + ["--output-dir", "{tmp}/o"],
        1,
        "bad.jsonl:1: not JSON",
    ),
    (
        ["eval", "explanation", "--pred", "{tmp}/bad.jsonl", "--gt", "{tmp}/nope", "--dataset", "loki"]
        + ["--output-dir", "o"],
        2,
        "--gt",
    ),
    (["eval", "detection", "--pred", "{tmp}/bad.jsonl", "--output-dir", "{tmp}/o"], 1, "bad.jsonl:1: not JSON"),
    (["eval", "detection", "--pred", "{tmp}/no_subset.jsonl", "--output-dir", "{tmp}/o"], 2, "give --gt"),
    (["eval", "compare", "{tmp}/nope"], 2, "no such file or directory"),
    (["eval", "compare", "{tmp}/empty"], 2, "no metrics.json"),
    (["cls-train", "epoch=3"], 2, "did you mean 'epochs'"),
    (["cls-train", "data.train={tmp}/nope", "model.backbone={tmp}/empty"], 2, "data.train"),
    (["cls-eval", "detector_path={tmp}/nope", "data.test={tmp}/empty"], 2, "detector"),
    (["cls-eval", "detector_path={tmp}/empty", "data.test={tmp}/empty", "output_dir={tmp}/o"], 1, "0_real"),
    (
        ["cls-eval", "detector_path={tmp}/empty", "data.test={tmp}/empty", "output_dir={tmp}/o", "device=gpu"],
        2,
        "'gpu'",
    ),
    (["regenerate", "--config", "{repo}/configs/tiny/regenerate.yaml"], 2, "no input"),
    (["regenerate", "--config", "{repo}/configs/tiny/regenerate.yaml", "--prompts", "{tmp}/bad.json"], 2, "not JSON"),
    (
        ["regenerate", "--prompts", "{tmp}/p.txt", "--output-dir", "{tmp}/o", "scorer.kind=nope"],
        2,
        "unknown scorer kind",
    ),
    (
        ["regenerate", "--prompts", "{tmp}/p.txt", "--output-dir", "{tmp}/o"]
        + ["scorer.kind=clip", "scorer.model_dir={tmp}"],
        1,
        "no transformers CLIP model",
    ),
    (["inpaint", "--config", "{repo}/configs/tiny/inpaint.yaml", "--inputs", "{tmp}/nope.json"], 2, "not found"),
    (["inpaint", "--inputs", "{tmp}/m.json", "dilation.kernel=0"], 2, "kernel >= 1"),
    (["app", "--model", "{tmp}/empty", "--port", "70000"], 2, "not a port number"),
    (["app", "--model", "{tmp}/empty", "--queue-size", "0"], 2, "--queue-size must be >= 1"),
    (["app", "--model", "{tmp}/nope"], 2, "nope"),
    (["report", "{tmp}/nope"], 2, "no such folder"),
    (["report", "{tmp}/empty"], 2, "no log.jsonl, predictions.jsonl or metrics.json"),
    (["export", "{tmp}/empty"], 2, "--output-dir"),
    (["export", "{tmp}/nope", "--output-dir", "{tmp}/o"], 2, "no such folder"),
    (["export", "{tmp}/empty", "--output-dir", "{tmp}/o"], 1, "no config.json"),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "no_subset.jsonl").write_text(json.dumps({"path": "x.png", "fake_prob": 0.5}) + "\n")
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "m.json").write_text(json.dumps({"a_file": "a cat"}))
    return tmp_path


def _argv(argv, tmp_path):
    return [a.replace("{tmp}", str(tmp_path)).replace("{repo}", str(REPO)) for a in argv]


@pytest.mark.parametrize("argv, exit_code, fragment", CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_a_deliberate_error_is_one_line_on_stderr(argv, exit_code, fragment, files, capsys, monkeypatch):
    monkeypatch.delenv("LEGION_DEBUG", raising=False)
    code = main(_argv(argv, files))
    out, err = capsys.readouterr()
    command = argv[0] if argv[0] not in ("eval", "merge", "data") else " ".join(argv[:2])
    assert code == exit_code, err
    assert err.startswith(f"legion {command}: error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in out


def test_every_command_is_covered():
    assert {argv[0] for argv, _, _ in CASES} == set(COMMANDS)
    for sub in ("step1", "step2"):
        assert any(argv[:2] == ["merge", sub] for argv, _, _ in CASES)
    for sub in ("localization", "explanation", "detection", "compare"):
        assert any(argv[:2] == ["eval", sub] for argv, _, _ in CASES)


def test_legion_debug_reraises(files, monkeypatch, capsys):
    monkeypatch.setenv("LEGION_DEBUG", "1")
    with pytest.raises(InputNotFoundError, match="no such file or directory"):
        main(["eval", "compare", str(files / "nope")])
    assert capsys.readouterr().err == ""


def test_a_bug_is_not_swallowed(monkeypatch):
    import legion.model.inspect

    def broken(_):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(legion.model.inspect, "build_meta_model", broken)
    with pytest.raises(ZeroDivisionError):
        main(["inspect", "tiny"])


def test_multi_line_messages_become_one_line_and_ctrl_c_exits_130(monkeypatch, capsys):
    import legion.model.inspect

    def raiser(exc):
        def f(_):
            raise exc

        return f

    monkeypatch.delenv("LEGION_DEBUG", raising=False)
    monkeypatch.setattr(legion.model.inspect, "build_meta_model", raiser(DataError("first line\n  second line\n")))
    assert main(["inspect", "tiny"]) == 1
    assert capsys.readouterr().err == "legion inspect: error: first line | second line\n"
    monkeypatch.setattr(legion.model.inspect, "build_meta_model", raiser(KeyboardInterrupt()))
    assert main(["inspect", "tiny"]) == 130
    assert capsys.readouterr().err == "legion inspect: interrupted\n"


def test_error_classes_keep_their_builtin_bases():
    from legion.config import ConfigError
    from legion.controller.cases import CaseError
    from legion.data.synthscars import AnnotationFormatError
    from legion.infer import InferError
    from legion.merge import MergeError
    from legion.model.builders import CheckpointError

    for cls, builtin, code in (
        (ConfigError, ValueError, 2),
        (CaseError, ValueError, 2),
        (InferError, RuntimeError, 2),
        (InputNotFoundError, FileNotFoundError, 2),
        (MergeError, RuntimeError, 1),
        (CheckpointError, ValueError, 1),
        (AnnotationFormatError, ValueError, 1),
        (DataError, ValueError, 1),
    ):
        assert issubclass(cls, LegionError) and issubclass(cls, builtin) and cls.exit_code == code
        assert issubclass(cls, UsageError) == (code == 2)
    assert one_line(LegionError()) == "LegionError"


def _command_missing(package, when, tmp_path, monkeypatch):
    """`legion app` replaced by a module that misses `package` when it is imported or when it runs."""
    import legion.cli

    missing = f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')"
    body = missing if when == "import" else f"def add_arguments(parser):\n    pass\n\n\ndef run(args):\n    {missing}"
    module = f"needs_{package}_at_{when}"
    (tmp_path / f"{module}.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(legion.cli.COMMANDS, "app", (module, "a command that misses a package"))


@pytest.mark.parametrize("when", ["import", "run"])
def test_a_missing_optional_package_names_its_extra_and_legion_debug_reraises(when, tmp_path, monkeypatch, capsys):
    _command_missing("gradio", when, tmp_path, monkeypatch)
    monkeypatch.delenv("LEGION_DEBUG", raising=False)
    assert main(["app"]) == 2
    assert capsys.readouterr().err == (
        "legion app: error: needs the optional package 'gradio': pip install 'legion[app]'"
        " (or bash scripts/setup_env.sh)\n"
    )
    monkeypatch.setenv("LEGION_DEBUG", "1")  # re-raised, as every other error, wherever it is met
    with pytest.raises(ModuleNotFoundError, match="gradio"):
        main(["app"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("when", ["import", "run"])
def test_a_missing_package_that_is_no_extra_is_a_bug(when, tmp_path, monkeypatch):
    _command_missing("nope", when, tmp_path, monkeypatch)
    monkeypatch.delenv("LEGION_DEBUG", raising=False)
    with pytest.raises(ModuleNotFoundError, match="nope"):
        main(["app"])
