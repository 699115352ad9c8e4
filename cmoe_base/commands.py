"""The error boundary every console command shares: a user's mistake is one line, exit status 2.

    @command("cmoe-eval")
    def main(argv=None) -> int:
        ap = Parser(prog="cmoe-eval", ...)
        ap.add_argument("--batch-size", type=positive_int, ...)
        args = ap.parse_args(argv)          # before anything heavy loads

What counts as the user's: a bad option (the parser's errors, the range-checked types below), and
a bad or missing input file (InputError naming the file and record, ConfigError naming the field,
any ValueError or OSError escaping the command: our loaders raise ValueError subclasses whose
message names the file). Those print `PROG: error: MESSAGE` on stderr as one line and return 2.
Anything else is a bug and keeps its traceback. CMOE_TRACEBACK=1 shows the traceback of a user
error too (for debugging the commands themselves).
"""
from __future__ import annotations

import argparse
import json
import functools
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

USER_ERROR_STATUS = 2


class InputError(ValueError):
    """A file, record or option the user can fix. The message names it (path, line, field)."""


def json_object(line: str, where: str) -> dict:
    """One JSONL line that must hold a JSON object; an InputError naming `where` (file:line) otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: {e}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    return obj


class UsageError(InputError):
    """A command-line option that is missing, unknown or out of range."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are raised (one line at the boundary) instead of printing the usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


def report(prog: str, err: BaseException) -> int:
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
    return USER_ERROR_STATUS


def command(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Wrap a command's main: user errors (ValueError, OSError, KeyboardInterrupt excluded) become
    one line and status 2; the main's own status is returned otherwise."""
    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except (ValueError, OSError) as e:
                if os.environ.get("CMOE_TRACEBACK"):
                    raise
                return report(prog, e)
        return run
    return wrap


# ----------------------------------------------------------------------------- option types

def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def _bounded(kind: type, low: float, inclusive: bool, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _number(text, kind)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{text}: must be {what}")
        return value
    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _bounded(int, 1, True, "an integer >= 1")
non_negative_int = _bounded(int, 0, True, "an integer >= 0")
positive_float = _bounded(float, 0.0, False, "a number > 0")
non_negative_float = _bounded(float, 0.0, True, "a number >= 0")
finite_float = _bounded(float, -math.inf, True, "a finite number")


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be in [0, 1]")
    return value
