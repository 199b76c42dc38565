"""``lpft soup DB --runs DIR``: uniform and greedy model soups of a sweep's kept runs, stored beside its trials."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpft.commands.common import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soup", help="average the tuned weights of a sweep's runs: uniform and greedy model soups")
    p.add_argument("db", type=Path, help="the sweep's results database")
    p.add_argument("--runs", type=Path, required=True, metavar="DIR",
                   help="where the sweep kept its runs (lpft sweep SPEC --keep-runs DIR)")
    p.add_argument("--sweep", default=None, help="the sweep to soup (default: the database's only sweep)")
    p.add_argument("--method", default="lpft", help="the method whose runs are the ingredients")
    add_device_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console, new_table
    from lpft.data.splits import display_name
    from lpft.errors import ConfigError
    from lpft.methods import method_label
    from lpft.results.report import sweep_names
    from lpft.results.soup import cook_sweep
    from lpft.runs import resolve_device

    sweeps = sweep_names(args.db, args.sweep)
    if len(sweeps) != 1:
        raise ConfigError(f"{args.db} holds sweeps {sweeps}; name one with --sweep" if sweeps
                          else f"{args.db} has no finished trials" + (f" of sweep {args.sweep!r}" if args.sweep else ""))
    rows = cook_sweep(args.db, sweeps[0], args.runs, args.method, resolve_device(args.device))
    splits = list(rows[0]["accuracy"])
    where = sorted({f"{r['task']} / {r['backbone']}" for r in rows})
    many = len(where) > 1  # name the task and backbone per row only when they vary
    table = new_table(
        f"model soups of {method_label(args.method)} ({sweeps[0]}{'' if many else ', ' + where[0]}): accuracy (%)",
        [*(["task / backbone"] if many else []), "seed", "soup", "ingredients", *(display_name(k) for k in splits),
         "state"],
        [[*([f"{r['task']} / {r['backbone']}"] if many else []), str(r["seed"]), method_label(r["soup"]),
          f"{r['ingredients']} of {r['tried']}", *(f"{100 * r['accuracy'][k]:.1f}" for k in splits), r["state"]]
         for r in rows],
        text_columns=3 + many,
    )
    console.print(table)
    console.print(f"stored in {args.db}: `lpft report {args.db}` shows the soups beside {args.method}", markup=False)
    return 0
