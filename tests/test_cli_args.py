"""`--output-dir` is the one output flag; `--out` is a hidden alias that says it is deprecated."""

import argparse
import importlib
import re

import pytest

import legion.cli
from legion.cli import COMMANDS, main

DEPRECATED = "{prog}: --out is deprecated, use --output-dir"

# every command that writes an output folder or file, with the other arguments it requires
WITH_OUTPUT = [
    (["demo"], "legion demo"),
    (["make-toy-data"], "legion make-toy-data"),
    (["make-tiny"], "legion make-tiny"),
    (["merge", "step1", "ckpt"], "legion merge step1"),
    (["merge", "step2", "--base", "b", "--weights", "w"], "legion merge step2"),
    (["eval", "localization", "--pred", "p", "--gt", "g", "--dataset", "synthscars"], "legion eval localization"),
    (["eval", "explanation", "--pred", "p", "--gt", "g", "--dataset", "loki"], "legion eval explanation"),
    (["eval", "detection", "--pred", "p"], "legion eval detection"),
    (["eval", "compare", "run"], "legion eval compare"),
    (["regenerate"], "legion regenerate"),
    (["inpaint"], "legion inpaint"),
]


@pytest.fixture
def parsed(monkeypatch):
    """main() parses as usual and returns the Namespace instead of running the command."""
    seen = {}

    def capture(name, module, args):
        seen["args"] = args
        return 0

    monkeypatch.setattr(legion.cli, "_run_command", capture)
    return seen


@pytest.mark.parametrize("argv, prog", WITH_OUTPUT)
def test_output_dir_and_its_deprecated_alias(argv, prog, parsed, capsys):
    assert main([*argv, "--output-dir", "x"]) == 0
    assert parsed["args"].output_dir == "x" and capsys.readouterr().err == ""
    assert main([*argv, "--out", "y"]) == 0
    assert parsed["args"].output_dir == "y"
    assert capsys.readouterr().err.splitlines() == [DEPRECATED.format(prog=prog)]
    assert main([*argv, "--out=z"]) == 0 and parsed["args"].output_dir == "z"


@pytest.mark.parametrize("argv, prog", WITH_OUTPUT)
def test_help_shows_only_output_dir(argv, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--output-dir" in text and not re.search(r"--out\b(?!put)", text)


def test_a_required_output_dir_is_met_by_either_flag_and_named_when_missing(parsed, capsys):
    with pytest.raises(SystemExit):
        main(["make-tiny"])
    assert "the following arguments are required: --output-dir" in capsys.readouterr().err
    assert main(["make-tiny", "--out", "d"]) == 0 and parsed["args"].output_dir == "d"


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_command_declares_out_on_its_own(command):
    """`--out` exists only as the alias that legion.cli_args adds next to `--output-dir`."""
    from legion.cli_args import add_output_dir_argument

    parser = argparse.ArgumentParser(prog=f"legion {command}")
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    for p in _parsers(parser):
        for action in p._actions:
            assert "--out" not in action.option_strings, (p.prog, action.option_strings)
        if "--out" in p._option_string_actions:
            action = p._option_string_actions["--out"]
            assert action is p._option_string_actions["--output-dir"] and action.dest == "output_dir"
            assert type(action).__module__ == add_output_dir_argument.__module__
