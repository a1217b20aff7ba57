"""The ``gradguard`` command line: argument parsing and error formatting only.

Each sub-command lives with the part it drives and registers itself here through a
``register(subparsers)`` function that sets ``func`` (``args -> exit code``) on its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradguard import __version__
from gradguard.attach import command as run_command
from gradguard.errors import GradGuardError
from gradguard.lab import command as lab_command
from gradguard.preflight import command as probe_command

#: Exit codes: 0 success, 1 a checked claim or verdict failed, 2 bad usage or bad input.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (plus the usage) and exits with :data:`EXIT_USAGE`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"gradguard: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered sub-command."""
    parser = _Parser(prog="gradguard", description="Show, detect and cure vanishing and exploding gradients.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    # Sub-commands register here (one line each).
    lab_command.register(sub)
    probe_command.register(sub)
    run_command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GradGuardError as exc:
        print(f"gradguard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
