"""``lpft data list|prepare|check``: see and prepare the bundled benchmarks ahead of time, and
decode every image of a task before training on it."""

from __future__ import annotations

import argparse
import os

from lpft.errors import LpftError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list or prepare the bundled benchmarks; check every image of a task",
                       description="list: the bundled benchmarks. prepare NAMES: build and cache them ahead of time. "
                                   "check TASK: decode every image of a task (YAML or benchmark) and list each bad "
                                   "file; exits 1 when any is bad.")
    p.add_argument("action", choices=["list", "prepare", "check"])
    p.add_argument("names", nargs="*", help="benchmarks to prepare (default: all), or the one task to check")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="check: processes decoding images (default: the cores available)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console
    from lpft.data import benchmark_names, load_task

    if args.action == "check":
        return check(args)
    if args.action == "list":
        for name in benchmark_names():
            console.print(name, markup=False)
        return 0
    for name in args.names or benchmark_names():
        console.print(load_task(name).summary(), markup=False)
    return 0


def check(args: argparse.Namespace) -> int:
    """Decode every image of one task; print a table of the bad ones and a summary. Exit 1 if any is bad."""
    import time

    from lpft.commands.common import console, new_table
    from lpft.data import load_task
    from lpft.data.check import check_images, image_rows

    if len(args.names) != 1:
        raise LpftError(f"`lpft data check` takes one task (a YAML file or a benchmark name), got {args.names}")
    workers = len(os.sched_getaffinity(0)) if args.workers is None else args.workers
    if workers < 1:
        raise LpftError(f"--workers must be at least 1, got {workers}")
    task = load_task(args.names[0])
    images = len(image_rows(task))
    started = time.perf_counter()
    bad = check_images(task, workers)
    seconds = time.perf_counter() - started
    if bad:
        title = f"{len(bad)} unreadable image{'s' if len(bad) > 1 else ''} in {task.name}"
        rows = [(b.split, b.where, b.error) for b in bad]
        console.print(new_table(title, ["split", "where", "error"], rows, text_columns=3))
    rate = f"{images / seconds:,.0f} images/s" if images else "nothing to decode"
    console.print(f"{task.name}: decoded {images:,} images in {seconds:.1f} s ({rate}, {workers} "
                  f"worker{'s' if workers > 1 else ''}); "
                  f"{len(bad)} bad", markup=False, highlight=False)
    return 1 if bad else 0
