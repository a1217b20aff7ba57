"""The ``gradguard`` command line: argument parsing and error formatting only.

Each sub-command lives with the part it drives, in a module whose ``register(subparsers)`` adds its parser
and sets ``func`` (``args -> exit code``) on it. That module is imported only when its command is named on
the command line, so ``gradguard --help`` and ``gradguard --version`` import neither torch nor the lab.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from gradguard import __version__
from gradguard.errors import GradGuardError

#: Exit codes: 0 success, 1 a checked claim or verdict failed, 2 bad usage or bad input.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Sub-command -> (module with its ``register``, its one-line help in ``gradguard --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "lab": ("gradguard.lab.command", "reproduce vanishing/exploding-gradient results as experiments with reports"),
    "report": ("gradguard.lab.command", "re-render a lab run's reports, draw a run log, or compare two run logs"),
    "probe": ("gradguard.preflight.command", "diagnose a model on one random batch before training"),
    "run": ("gradguard.attach.command", "run an unmodified training program with the monitor attached"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (plus the usage) and exits with :data:`EXIT_USAGE`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"gradguard: error: {message}\n")


def build_parser(commands: Collection[str] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The parser with the sub-commands in ``commands`` registered by their modules (all by default).

    Every other sub-command gets a placeholder that only carries its help line from :data:`COMMANDS`,
    so the top-level help lists them all without importing their modules.
    """
    parser = _Parser(prog="gradguard", description="Show, detect and cure vanishing and exploding gradients.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in dict.fromkeys(COMMANDS[name][0] for name in COMMANDS if name in commands):
        importlib.import_module(module).register(sub)
    for name, (_, help_line) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_line)
    return parser


def _named_command(argv: Sequence[str]) -> list[str]:
    """The sub-command ``argv`` names: its first word that is not an option (top-level options take no value)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return [first] if first in COMMANDS else []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script; returns the exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_named_command(words)).parse_args(words)
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
