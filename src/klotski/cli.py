"""The `klotski` command line: subcommands map flags onto config fields.

Every subcommand lives in klotski/commands/ and registers itself here through a
`register(subparsers)` function; this module only dispatches and turns user errors into
exit code 2 without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from klotski.errors import KlotskiError
from klotski.sampling import is_utf8

# Modules that define `register(subparsers)`; each adds one or more subcommands.
COMMAND_MODULES = (
    "klotski.commands.generate",
    "klotski.commands.run_batch",
    "klotski.commands.create_model",
    "klotski.commands.prefetch",
    "klotski.commands.plan",
    "klotski.commands.perplexity",
    "klotski.commands.serve",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `klotski: error: --max-tokens: expected an integer, got 'x'`
    and a pointer to --help, instead of a usage dump (exit code 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(2, f"klotski: error: {_one_line(message)}; see '{self.prog} --help'\n")


_ARGPARSE_WORDS = (
    (re.compile(r"^argument (\S+?)(?:/\S+)?: invalid int value: (.*)$"), r"\1: expected an integer, got \2"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: invalid float value: (.*)$"), r"\1: expected a number, got \2"),
    (re.compile(r"^argument COMMAND: invalid choice: (\S+) (.*)$"), r"unknown command \1 \2"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: invalid choice: (.*)$"), r"\1: \2"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: expected one argument$"), r"\1: expected a value after it"),
    (re.compile(r"^argument (\S+?)(?:/\S+)?: (.*)$"), r"\1: \2"),
    (re.compile(r"^the following arguments are required: COMMAND$"), "no command given (generate, plan, ...)"),
)


def _one_line(message: str) -> str:
    """argparse's message with the flag first and what was expected, on one line."""
    message = " ".join(message.split())
    for pattern, replacement in _ARGPARSE_WORDS:
        if pattern.match(message):
            return pattern.sub(replacement, message)
    return message


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = ArgumentParser(
        prog="klotski",
        description="Run Mixture-of-Experts models larger than device memory at high throughput.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # subparsers inherit ArgumentParser
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# Flags whose values are handled per input by their command (a bad --prompt skips that prompt only).
PER_INPUT_FLAGS = frozenset({"prompt"})


def check_utf8(args: argparse.Namespace) -> None:
    """A flag value holding bytes that are not UTF-8 (Python keeps them as lone surrogates) is an
    error now, before anything is loaded, not a UnicodeEncodeError when it is first printed."""
    for name, value in vars(args).items():
        if name in PER_INPUT_FLAGS:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not is_utf8(item):
                flag = "--" + name.replace("_", "-")
                raise KlotskiError(f"{flag}: the value {item!r:.60} is not valid UTF-8; pass UTF-8 text")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the subcommand's handler, map user errors to exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_utf8(args)
        return int(args.handler(args) or 0)
    except KlotskiError as exc:
        print(f"klotski: error: {_printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klotski: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `klotski ... | head`: the reader left; say nothing more, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError:
        print(
            "klotski: error: out of memory; set --device-memory / --host-memory to a budget this machine "
            "has, or lower --batch-size",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:  # the environment refused (disk full, permissions): not a bug in klotski
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"klotski: error: {_printable(where + (exc.strerror or str(exc)))}; check the path, its "
            "permissions and free space",
            file=sys.stderr,
        )
        return 2


def _printable(message: str) -> str:
    """One line, and printable on any stream: lone surrogates (non-UTF-8 input) become escapes."""
    return " ".join(message.splitlines()).encode("utf-8", "backslashreplace").decode("utf-8")
