"""Start-up time of the ``lpft`` command line: how long ``--help`` and ``--version`` take to answer.

Each case runs ``python -m lpft.cli ARGS`` in a fresh process ``--repeats`` times and prints
the median wall time and the median CPU time of the child (user + system). CPU time hardly
moves when other processes share the machine, so it is the number to compare across runs
on a busy host; wall time is what a user waits.

    python benchmarks/cli_startup.py                      # every case, 5 runs each
    python benchmarks/cli_startup.py --repeats 3 --cases "--help" "run --help"
    python benchmarks/cli_startup.py --json cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = [
    "--help", "--version", "run --help", "predict --help", "demo --help", "example --help", "data --help",
    "theory --help", "diagnose --help", "advise --help", "sweep --help", "report --help", "reproduce --help",
]


def time_once(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``python -m lpft.cli ARGS`` (its output discarded); a failure is an error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lpft.cli", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"lpft {shlex.join(args)} failed:\n{done.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(cases: list[str], repeats: int) -> list[dict]:
    """Median wall and CPU seconds of each case over ``repeats`` runs, after one untimed warm-up run."""
    rows = []
    for case in cases:
        args = shlex.split(case)
        time_once(args)  # warm the file cache (and .pyc files) so the first timed run is not an outlier
        walls, cpus = zip(*(time_once(args) for _ in range(repeats)))
        rows.append({"case": f"lpft {case}", "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                     "repeats": repeats})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default: %(default)s)")
    parser.add_argument("--cases", nargs="+", default=CASES, help="argument lists to time (default: all sub-commands)")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians to this JSON file")
    args = parser.parse_args()
    rows = measure(args.cases, args.repeats)
    width = max(len(r["case"]) for r in rows)
    print(f"{'command':<{width}}  {'wall s':>7}  {'cpu s':>7}   (medians of {args.repeats} runs; load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['wall_s']:>7.2f}  {r['cpu_s']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
