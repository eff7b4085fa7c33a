"""Command-line arguments that several commands share, defined once.

    add_output_dir_argument(parser, help="output directory", required=True)   # -> args.output_dir
    check_output_dir_argument(args.output_dir)   # OptionError when it names a file

Every command that writes an output folder or file takes it as `--output-dir` (the flag of the
config key `output_dir`). The old `--out` still works for one release: it is hidden from `--help`
and prints one line on stderr, `<prog>: --out is deprecated, use --output-dir`.
"""

from __future__ import annotations

import argparse
import os
import sys

from legion.errors import OptionError

OUTPUT_DIR_FLAG = "--output-dir"
DEPRECATED_OUTPUT_FLAG = "--out"


class _OutputDirAction(argparse.Action):
    """Store the value; note on stderr when it came through the deprecated alias."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == DEPRECATED_OUTPUT_FLAG:
            print(
                f"{parser.prog}: {DEPRECATED_OUTPUT_FLAG} is deprecated, use {OUTPUT_DIR_FLAG}",
                file=sys.stderr,
                flush=True,
            )
        setattr(namespace, self.dest, values)


def add_output_dir_argument(
    parser: argparse.ArgumentParser, help: str, required: bool = False, default: str | None = None, **kwargs
) -> argparse.Action:
    """`--output-dir` (dest `output_dir`), with `--out` as a hidden, deprecated alias of the same action.

    One action answers to both flags, so `required=True` is met by either. The alias is then taken
    out of the action's displayed names: the parser still maps `--out` to the action, while `--help`,
    the usage line and error messages show only `--output-dir`.
    """
    action = parser.add_argument(
        OUTPUT_DIR_FLAG,
        DEPRECATED_OUTPUT_FLAG,
        dest="output_dir",
        action=_OutputDirAction,
        required=required,
        default=default,
        help=help,
        **kwargs,
    )
    action.option_strings.remove(DEPRECATED_OUTPUT_FLAG)
    return action


def check_output_dir_argument(output_dir: str | os.PathLike) -> None:
    """OptionError when `--output-dir` names something that exists and is not a directory."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OptionError(f"{OUTPUT_DIR_FLAG} {output_dir} exists and is not a directory")
