"""``lpft data list|prepare``: see and prepare the bundled benchmarks ahead of time."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list or prepare the bundled benchmarks")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("names", nargs="*", help="benchmarks to prepare (default: all)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console
    from lpft.data import benchmark_names, load_task

    if args.action == "list":
        for name in benchmark_names():
            console.print(name, markup=False)
        return 0
    for name in args.names or benchmark_names():
        console.print(load_task(name).summary(), markup=False)
    return 0
