"""``lpft reproduce``: the paper's protocol on every bundled benchmark, one command, one table each.

The default mode is sized for a 2-core CPU (EfficientNet-Lite0 at 48 px on emoji-styles and
32 px on digits, 2 learning rates per method, 3 epochs, 3 seeds); ``--full`` runs the paper's
grids (6 learning rates per method) and 20 epochs at full resolution, for a GPU. The specs
ship with the package (``lpft/reproduce/*.yaml``); all trials go to one results database, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from lpft.commands.common import add_device_argument, add_rules_argument

if TYPE_CHECKING:
    from lpft.results.spec import SweepSpec

FULL_SUFFIX = "-full"


def packaged_benchmarks() -> list[str]:
    """Benchmarks with a bundled spec (``lpft/reproduce/<name>.yaml``): adding a spec file adds a benchmark here."""
    files = resources.files("lpft") / "reproduce"
    stems = sorted(f.name.removesuffix(".yaml") for f in files.iterdir() if f.name.endswith(".yaml"))
    return [s for s in stems if not s.endswith(FULL_SUFFIX)]


def packaged_spec(benchmark: str, full: bool) -> SweepSpec:
    """The bundled sweep spec of a benchmark (``-full`` variant with ``full``)."""
    from lpft.results.spec import load_spec

    name = f"{benchmark}{FULL_SUFFIX if full else ''}.yaml"
    with resources.as_file(resources.files("lpft") / "reproduce" / name) as path:
        return load_spec(path)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="the paper's LP / FT / LP-FT protocol on every bundled benchmark")
    p.add_argument("--full", action="store_true", help="the paper's grids and epochs at full resolution (for a GPU)")
    benchmarks = packaged_benchmarks()
    p.add_argument("--benchmarks", nargs="+", choices=benchmarks, default=benchmarks, metavar="NAME",
                   help=f"which bundled benchmarks: {', '.join(benchmarks)} (default: all)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for the results database and the report (default: runs/reproduce[-full])")
    add_device_argument(p, default=None, when_none="each spec's, else auto")
    add_rules_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console
    from lpft.commands.report import parse_rules, print_report
    from lpft.results.report import load_results, write_report
    from lpft.results.sweep import run_sweep

    start = time.perf_counter()
    out = args.out or Path("runs") / ("reproduce-full" if args.full else "reproduce")
    db = out / "results.sqlite"
    specs = [packaged_spec(b, args.full) for b in args.benchmarks]
    failed = 0
    for i, spec in enumerate(specs, 1):
        console.rule(f"[{i}/{len(specs)}] {spec.name}")
        summary = run_sweep(spec, db, args.device)
        failed += summary.failed
        console.print(f"{spec.name}: {summary.total} trials ({summary.skipped} already done, {summary.finished} run, "
                      f"{summary.failed} failed) in {summary.seconds:.0f}s")
    trials = [t for spec in specs for t in load_results(db, spec.name)]
    report = write_report(trials, out, parse_rules(args.rules), image_prefix="reproduce_",
                          title="lpft reproduce" + (" --full" if args.full else ""), sweeps=specs, command=sys.argv, db=db)
    print_report(report)
    console.print(f"wall time {time.perf_counter() - start:.0f}s; results database {db}")
    return 1 if failed else 0
