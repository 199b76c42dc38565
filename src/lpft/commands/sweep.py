"""``lpft sweep SPEC``: run a sweep spec into a results database (resumable), then report it."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpft.commands.common import console
from lpft.commands.report import add_rules_argument, parse_rules, print_report
from lpft.report import load_results, write_report
from lpft.sweep import load_spec, run_sweep


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a sweep spec (YAML); re-running resumes, skipping finished trials")
    p.add_argument("spec", type=Path, help="sweep spec YAML (task, backbones, methods and grids, seeds)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<sweep name>)")
    p.add_argument("--db", type=Path, default=None, help="results database (default: <out>/results.sqlite)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the spec's, else auto)")
    p.add_argument("--no-report", action="store_true", help="only run the trials")
    add_rules_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    out = args.out or Path("runs") / spec.name
    db = args.db or out / "results.sqlite"
    summary = run_sweep(spec, db, args.device)
    console.print(
        f"sweep {spec.name}: {summary.total} trials, {summary.skipped} already finished, {summary.finished} run now, "
        f"{summary.failed} failed ({summary.seconds:.0f}s); results in {db}"
    )
    if not args.no_report:
        report = write_report(load_results(db, spec.name), out / "report", parse_rules(args.rules),
                              title=f"lpft sweep: {spec.name}")
        print_report(report)
    return 1 if summary.failed else 0
