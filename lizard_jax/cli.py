"""What every command line shares: user errors end in one `error: ...` line on stderr and exit status 2.

A user error is an input the user can fix: a missing, empty, corrupt or wrong-kind file, an unknown or mistyped
config key, a value out of range, a bad flag. The library raises `UserError` subclasses for them
(`config.ConfigError`, `checkpoint.CheckpointError`, `convert.ConversionError`, `export.ExportError`,
`train.data.DataError`, `train.loop.LossNotFinite`, `InputError` for a bad argument); missing / existing /
wrong-kind paths are Python's own OSError subclasses. Every entry point is a `@command` function
`main(argv) -> int`: it returns 2 after printing such an error and lets anything else (a bug) propagate with its
traceback. `ArgumentParser` makes argparse's own errors the same one line.

This module imports nothing of lizard_jax, so that every layer of the library can raise its errors.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """An input the user can fix; a command prints `error: <message>` and exits 2."""


class InputError(UserError, ValueError):
    """A value given by the caller (an argument, a flag, a text) that cannot work."""


# Path errors name the path in their message: the user gave a file that is missing, exists or is the wrong kind.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
EXIT_USER_ERROR = 2  # argparse's status for a bad command line


def error_line(e: BaseException) -> str:
    """`error: <message>` on one line (an embedded traceback or JSON dump is folded onto it)."""
    return "error: " + " ".join(str(e).split())


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap an entry point `main(argv) -> exit status`: a user error prints `error_line` on stderr and returns 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(error_line(e), file=sys.stderr, flush=True)
            return EXIT_USER_ERROR

    return run


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, `error: PROG: message (see PROG --help)`, exit status 2 (subcommand
    parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        print(error_line(Exception(f"{self.prog}: {message} (see {self.prog} --help)")), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low` (e.g. `--seq-len` needs 2 tokens: one to predict from, one to score)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}"
    return parse

