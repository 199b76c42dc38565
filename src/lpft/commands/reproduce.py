"""``lpft reproduce``: the paper's protocol on every bundled benchmark, one command, one table each.

The default mode is sized for a 2-core CPU (EfficientNet-Lite0 at 48 px on emoji-styles and
32 px on digits, 3 learning rates per method, 3 epochs, 3 seeds); ``--full`` runs the paper's
grids (6 learning rates per method) and 20 epochs at full resolution, for a GPU. The specs
ship with the package (``lpft/reproduce/*.yaml``); all trials go to one results database, so
an interrupted run resumes where it stopped.

By default only the paper's three methods run; the default specs also hold a CPU-sized grid
for every robust fine-tuning method, run with ``--methods`` (names, or ``all``). Model soups
(``uniform-soup``, ``greedy-soup``) average each seed's LP-FT runs, so asking for one runs
LP-FT with its tuned weights kept (``<out>/kept``), then cooks the soups into the database.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from lpft.commands.common import add_device_argument, add_rules_argument

if TYPE_CHECKING:
    import torch

    from lpft.results.spec import SweepSpec

FULL_SUFFIX = "-full"
ALL = "all"
PAPER_METHODS = ("lp", "ft", "lpft")
SOUP_OF = "lpft"  # soups average LP-FT runs: within a seed they share the probe's head, so their weights average


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
    p.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), metavar="NAME",
                   help="which methods: any in the benchmark specs (lp, ft, lpft, wise-ft, l2-sp, llrd, surgical, spd, "
                        "lora), uniform-soup and greedy-soup (of the LP-FT runs), or all (default: lp ft lpft)")
    add_device_argument(p, default=None, when_none="each spec's, else auto")
    add_rules_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console
    from lpft.commands.report import parse_rules, print_report
    from lpft.methods.base import POST_HOC_LABELS
    from lpft.results.report import load_results, write_report
    from lpft.results.sweep import run_sweep
    from lpft.runs import resolve_device

    start = time.perf_counter()
    out = args.out or Path("runs") / ("reproduce-full" if args.full else "reproduce")
    db = out / "results.sqlite"
    specs = [packaged_spec(b, args.full) for b in args.benchmarks]
    chosen = chosen_methods(args.methods, specs)
    soups = sorted(chosen & set(POST_HOC_LABELS))
    failed = 0
    for i, spec in enumerate(specs, 1):
        console.rule(f"[{i}/{len(specs)}] {spec.name}")
        methods = {m: grid for m, grid in spec.methods.items() if m in chosen or (soups and m == SOUP_OF)}
        missing = sorted(chosen - set(spec.methods) - set(POST_HOC_LABELS))
        if missing:
            console.print(f"{spec.name}: no grid for {', '.join(missing)} (not applicable to its backbone)")
        # the soups' ingredients run first, keeping their weights; then every other method, keeping nothing
        parts = [({SOUP_OF: methods.pop(SOUP_OF)}, out / "kept")] if soups and SOUP_OF in methods else []
        parts += [(methods, None)] if methods else []
        for part, keep in parts:
            summary = run_sweep(replace(spec, methods=part), db, args.device, keep_runs=keep)
            failed += summary.failed
            console.print(f"{spec.name} ({', '.join(part)}): {summary.total} trials ({summary.skipped} already done, "
                          f"{summary.finished} run, {summary.failed} failed) in {summary.seconds:.0f}s")
        if soups and parts and SOUP_OF in parts[0][0]:
            cook_soups(db, spec.name, out / "kept", resolve_device(args.device or spec.device))
    trials = [t for spec in specs for t in load_results(db, spec.name) if t.method in chosen]
    report = write_report(trials, out, parse_rules(args.rules), image_prefix="reproduce_",
                          title="lpft reproduce" + (" --full" if args.full else ""), sweeps=specs, command=sys.argv, db=db)
    print_report(report)
    console.print(f"wall time {time.perf_counter() - start:.0f}s; results database {db}")
    return 1 if failed else 0


def chosen_methods(requested: list[str], specs: list[SweepSpec]) -> set[str]:
    """The methods ``--methods`` names (``all``: every method of the specs and every soup), checked."""
    from lpft.methods.base import POST_HOC_LABELS

    known = {m for spec in specs for m in spec.methods} | set(POST_HOC_LABELS)
    if ALL in requested:
        return known
    unknown = sorted(set(requested) - known)
    if unknown:
        from lpft.errors import ConfigError

        raise ConfigError(f"--methods: {', '.join(unknown)} not in the chosen benchmarks' specs; choose from "
                          f"{', '.join(sorted(known))} or {ALL}")
    return set(requested)


def cook_soups(db: Path, sweep: str, kept: Path, device: torch.device) -> None:
    """Cook the soups of ``sweep``'s LP-FT runs (refused when some finished without their weights kept)."""
    from lpft.commands.common import console
    from lpft.results.soup import cook_sweep

    rows = cook_sweep(db, sweep, kept, SOUP_OF, device)
    console.print(f"{sweep}: {len(rows)} soups ({sum(r['state'] == 'cooked' for r in rows)} cooked now)")
