"""The `klotski` command line: subcommands map flags onto config fields.

Every subcommand lives in klotski/commands/ and registers itself here through a
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
    "klotski.commands.create_model",
    "klotski.commands.prefetch",
    "klotski.commands.plan",
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
        importlib.import_module(name).register(sub)
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
