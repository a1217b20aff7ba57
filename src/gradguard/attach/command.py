"""``gradguard run [options] script.py [args...]`` and ``gradguard run -m package.module [args...]``.

The program runs as under ``python script.py``: ``__main__`` is the script (``runpy.run_path``), so the
classes it defines pickle as usual; ``sys.argv`` is its own; ``sys.path[0]`` is the script's folder (the
current folder for ``-m``); its output is untouched (gradguard writes to stderr only), its traceback is
shown as Python would show it, and gradguard exits with the program's exit code: 0, its ``sys.exit``
code, 1 for an uncaught exception, 130 after SIGINT, 143 after SIGTERM. gradguard's own usage errors exit
2 (a script that does not exist, a module that cannot be found, ``--out`` that cannot be written).

Under ``torchrun`` every rank writes its own log and report to ``DIR/rank<k>/`` (``k`` = its ``RANK``);
the default ``DIR`` is then ``runs/<script>-<TORCHELASTIC_RUN_ID>``, the same for all ranks; only rank 0
prints findings.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from gradguard.errors import ConfigError

EXIT_USAGE, EXIT_ERROR, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143


class Terminated(BaseException):
    """Raised in the program by SIGTERM, so that it unwinds (its ``finally`` blocks run) and the report is written."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` sub-command to the CLI."""
    run = sub.add_parser(
        "run", help="run an unmodified training program with the monitor attached",
        description="Run PROGRAM as `python PROGRAM ARGS` would, with gradguard's monitor attached; exit with its "
                    "exit code. Findings print to stderr as they appear; DIR gets metrics.jsonl and report.html.",
    )
    run.add_argument("--out", metavar="DIR", default=None,
                     help="output folder (default runs/<program>-<time>; under torchrun DIR/rank<k>)")
    run.add_argument("--guard", action="store_true",
                     help="make every optimizer step a guarded one (skip non-finite and spiking updates, roll back, "
                          "back off the learning rate)")
    run.add_argument("--probe", action="store_true", help="probe the model on its first batch before training")
    # Parsed by hand so that a bad value gives gradguard's one-line error, not argparse's usage block.
    run.add_argument("--log-every", default="10", metavar="N", help="steps between statistics fetches (default 10)")
    # REMAINDER: everything after -m MODULE (options included) is the module's own sys.argv[1:].
    run.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE [ARGS]", default=None,
                     help="run a module as `python -m MODULE ARGS` would")
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS]",
                     help="the script and its arguments (with -m: the module's arguments)")
    run.set_defaults(func=run_command)


def _log_every(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError(f"--log-every {text!r} is not an integer; use a whole number ≥ 1") from None
    if value < 1:
        raise ConfigError(f"--log-every {value} is out of range; allowed: 1 or more")
    return value


def _resolve(args: argparse.Namespace) -> tuple[str, str | None, list[str]]:
    """(name for the default folder, script path or None for -m, the program's sys.argv)."""
    if args.module is not None:
        if not args.module:
            raise ConfigError("-m needs a module name: gradguard run [options] -m package.module [args...]")
        module, *rest = args.module
        try:
            spec = importlib.util.find_spec(module)
        except Exception as exc:  # a parent package that fails to import, an invalid name
            raise ConfigError(f"module {module!r} cannot be imported ({type(exc).__name__}: {exc})") from None
        if spec is None:
            raise ConfigError(f"no module named {module!r} (searched the current folder and sys.path)")
        return module.rsplit(".", 1)[-1], None, [spec.origin or module, *rest]
    if not args.program:
        raise ConfigError("name the program to run: gradguard run [options] script.py [args...] or -m module")
    script = args.program[0]
    if not Path(script).is_file():
        raise ConfigError(f"script {script!r} does not exist or is not a file")
    # Absolute, as Python makes ``__file__`` and traceback paths of `python script.py`.
    return Path(script).stem, os.path.abspath(script), [script, *args.program[1:]]


def _out_dir(args: argparse.Namespace, name: str) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    default = f"runs/{name}-{run_id or time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out if args.out is not None else default)
    if "RANK" in os.environ:
        out = out / f"rank{os.environ['RANK']}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".gradguard-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc})") from None
    return out


def _own_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback without runpy's frames and gradguard's attach frames (its hooks and wrappers): the ones
    left are those Python would show for ``python script.py``."""
    here = os.path.dirname(os.path.abspath(__file__))
    frames = []
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name not in ("<frozen runpy>", runpy.__file__) and os.path.dirname(name) != here:
            frames.append(tb)
        tb = tb.tb_next
    kept = None
    for t in reversed(frames):
        kept = TracebackType(kept, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return kept


def _show(exc: BaseException) -> None:
    """Print an exception of the program as Python would at exit (through ``sys.excepthook``)."""
    tb = _own_frames(exc.__traceback__)
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run_command(args: argparse.Namespace) -> int:
    """Run the program with a :class:`gradguard.attach.session.Session`; returns the program's exit code."""
    log_every = _log_every(args.log_every)
    if args.module is not None:
        sys.path[0] = os.getcwd()  # as `python -m` has it, also under the `gradguard` console script
    name, script, argv = _resolve(args)
    out = _out_dir(args, name)

    from gradguard.attach.session import Session

    sys.argv = argv
    if script is not None:
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    session = Session(log_dir=out, guard=args.guard, probe=args.probe, log_every=log_every)
    status, code, reason = "complete", 0, ""
    try:
        if script is not None:
            runpy.run_path(script, run_name="__main__")
        else:
            runpy.run_module(args.module[0], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code, reason = _exit_code(exc)
        status = "complete" if code == 0 else "error"
    except KeyboardInterrupt as exc:  # Python prints the traceback of an uncaught Ctrl-C too
        status, code, reason = "interrupted", EXIT_SIGINT, "SIGINT"
        _show(exc)
    except Terminated:
        status, code, reason = "interrupted", EXIT_SIGTERM, "SIGTERM"
    except BaseException as exc:  # the program's own error: shown as Python shows it, then reported
        status, code, reason = "error", EXIT_ERROR, f"{type(exc).__name__}: {exc}"
        _show(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _finish(session, out, status, code, reason)
    return code


def _exit_code(exc: SystemExit) -> tuple[int, str]:
    """The process exit code Python gives ``raise SystemExit(code)`` (a message is printed, exit 1)."""
    if exc.code is None or exc.code == 0:
        return 0, ""
    if isinstance(exc.code, int):
        return exc.code, f"sys.exit({exc.code})"
    print(exc.code, file=sys.stderr)
    return EXIT_ERROR, f"sys.exit({exc.code!r})"


def _finish(session: Any, out: Path, status: str, code: int, reason: str) -> None:
    # A second Ctrl-C while the report is written must not lose the log's last line: ignore it meanwhile.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        targets = list(session.targets)
        paths = session.close(status, exit_code=code, reason=reason)
    finally:
        signal.signal(signal.SIGINT, previous)
    if not targets:
        print("gradguard: nothing to monitor: the program stepped no optimizer and ran no backward pass through "
              "a torch.nn.Module", file=sys.stderr)
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty: nothing was written there
        return
    for t in targets:
        counts: dict[str, int] = {}
        for f in t.monitor.findings:
            counts[f.severity] = counts.get(f.severity, 0) + 1
        found = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no findings"
        line = f"gradguard: `{t.name}`: {t.monitor.steps} steps, {found}"
        if t.guard is not None:
            g = t.guard
            line += f"; guard: {g.applied} applied, {g.skipped} skipped, {g.rollbacks} rollbacks"
        if status != "complete":
            line += f" (run {status}: {reason})"
        print(line, file=sys.stderr)
    for p in paths:
        print(f"gradguard: report: {p}", file=sys.stderr)
