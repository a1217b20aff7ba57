"""The ``gradguard lab list|run`` and ``gradguard report DIR [DIR2]`` sub-commands.

``report DIR`` redraws a lab run, or draws a run log (``gg.watch(model, log_dir=DIR)``, ``gradguard run --out
DIR``) as ``DIR/report.html``; ``report DIR DIR2`` draws two run logs side by side in
``DIR/compare-<name of DIR2>.html``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from gradguard.errors import ConfigError

if TYPE_CHECKING:
    from gradguard.lab.experiment import ExperimentInfo
    from gradguard.report.files import ExperimentResults

# The registry, experiments and plotting load on first use, so `gradguard --help` stays fast.

EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_OUT = "runs/lab"
SEED_MAX = 2**32 - 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``lab`` (with ``list`` and ``run``) and ``report`` sub-commands to the CLI."""
    lab = sub.add_parser("lab", help="reproduce vanishing/exploding-gradient results as experiments with reports")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="{list,run}", parser_class=type(lab))
    lab_sub.required = True
    ls = lab_sub.add_parser("list", help="one line per experiment: id, references, title")
    ls.set_defaults(func=_cmd_list)
    run = lab_sub.add_parser("run", help="run experiments and write their reports")
    run.add_argument("ids", nargs="*", metavar="ID", help="experiment ids (see `gradguard lab list`)")
    run.add_argument("--all", action="store_true", help="run every experiment and write DIR/index.html")
    run.add_argument("--quick", action="store_true", help="small configuration (seconds, used by the tests)")
    run.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT})")
    # Parsed by hand so that a bad value gives gradguard's one-line error, not argparse's usage block.
    run.add_argument("--seed", default="0", metavar="N", help=f"random seed, 0..{SEED_MAX} (default 0)")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="re-render a lab run's reports, draw a run log, or compare two run logs")
    rep.add_argument("dir", metavar="DIR", help="a run folder (from `lab run --out`), one experiment's folder, "
                     "or a run log's folder (gg.watch(model, log_dir=DIR), gradguard run --out DIR)")
    rep.add_argument("other", nargs="?", metavar="DIR2", help="a second run log's folder: both runs side by side "
                     "in DIR/compare-<name of DIR2>.html")
    rep.set_defaults(func=_cmd_report)


def parse_seed(text: str) -> int:
    """``--seed`` as an integer in ``[0, 2**32 − 1]``; raises :class:`ConfigError` otherwise."""
    try:
        seed = int(text, 10)
    except (TypeError, ValueError):
        raise ConfigError(f"--seed {text!r} is not an integer; use a whole number in 0..{SEED_MAX}") from None
    if not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed {seed} is out of range; allowed: 0..{SEED_MAX}")
    return seed


def _cmd_list(args: argparse.Namespace) -> int:
    from gradguard.lab import registry

    console = Console(highlight=False)
    table = Table(title="gradguard lab experiments")
    for col in ("id", "references", "title"):
        table.add_column(col)
    for e in registry.EXPERIMENTS:
        table.add_row(e.id, ", ".join(e.references), e.title)
    console.print(table)
    cover = registry.coverage()
    console.print("coverage: " + "; ".join(f"{s} → {', '.join(ids)}" for s, ids in cover.items()))
    return EXIT_OK


def _claims_table(results: list[ExperimentResults]) -> Table:
    from gradguard.report.html import format_value

    table = Table(title="claims")
    for col in ("", "experiment", "claim", "measured", "expected"):
        table.add_column(col)
    for r in results:
        for c in r.claims:
            mark = "[green]✓[/green]" if c["holds"] else "[red]✗[/red]"
            table.add_row(mark, r.id, f"{c['id']}: {c['statement']}", format_value(c["measured"]), str(c["expected"]))
    return table


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from gradguard.lab import registry
    from gradguard.lab.runner import prepare_out, run_many
    from gradguard.report.files import INDEX, REPORT

    if args.all and args.ids:
        raise ConfigError("give experiment ids or --all, not both")
    if not args.all and not args.ids:
        raise ConfigError(f"name at least one experiment or use --all; valid ids: {', '.join(registry.ids())}")
    seed = parse_seed(args.seed)
    infos = list(registry.EXPERIMENTS) if args.all else registry.select(args.ids)
    out = prepare_out(Path(args.out))
    console = Console(highlight=False)
    columns = (TextColumn("{task.description:<18}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:

        def progress(info: ExperimentInfo) -> Callable[[float], None]:
            task = bars.add_task(info.id, total=1.0)
            return lambda fraction: bars.update(task, completed=min(max(fraction, 0.0), 1.0))

        results = run_many(infos, out, seed=seed, quick=args.quick, progress=progress, index=len(infos) > 1)
    console.print(_claims_table(results))
    failed = sum(not c["holds"] for r in results for c in r.claims)
    total = sum(len(r.claims) for r in results)
    console.print(f"{total - failed}/{total} claims hold")
    for r in results:
        console.print(f"report: {r.folder / REPORT}", soft_wrap=True, markup=False)
    if len(results) > 1:
        console.print(f"index: {out / INDEX}", soft_wrap=True, markup=False)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from gradguard.report.files import find_experiments, load_experiment
    from gradguard.report.render import render_folder, render_index_file
    from gradguard.report.watch import is_watch_folder, render_compare_report, render_watch_report

    folder = Path(args.dir)
    console = Console(highlight=False)
    if args.other is not None:
        console.print(f"report: {render_compare_report(folder, Path(args.other))}", soft_wrap=True, markup=False)
        return EXIT_OK
    if is_watch_folder(folder):  # a gg.watch(model, log_dir=...) folder, not a lab run
        console.print(f"report: {render_watch_report(folder)}", soft_wrap=True, markup=False)
        return EXIT_OK
    folders = find_experiments(folder)
    for f in folders:
        console.print(f"report: {render_folder(f)}", soft_wrap=True, markup=False)
    if folders != [folder]:
        index = render_index_file(folder, [load_experiment(f) for f in folders])
        console.print(f"index: {index}", soft_wrap=True, markup=False)
    return EXIT_OK
