"""The `klotski` command line: subcommands map flags onto config fields.

Each subcommand lives beside the code it drives and registers itself here through a
`register(subparsers)` function; this module only dispatches and turns user errors into
exit code 2 without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from klotski.errors import KlotskiError

# Modules that define `register(subparsers)`; each adds one or more subcommands.
COMMAND_MODULES = (
    "klotski.commands.generate",
    "klotski.commands.run_batch",
    "klotski.commands.create_model",
    "klotski.prefetch.cli",
    "klotski.planner.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="klotski",
        description="Run Mixture-of-Experts models larger than device memory at high throughput.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command module not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the subcommand's handler, map user errors to exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KlotskiError as exc:
        print(f"klotski: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("klotski: interrupted", file=sys.stderr)
        return 130
