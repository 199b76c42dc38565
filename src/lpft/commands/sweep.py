"""``lpft sweep SPEC``: run a sweep spec into a results database (resumable), then report it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lpft.commands.common import add_device_argument, add_loader_arguments, add_rules_argument, add_track_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a sweep spec (YAML); re-running resumes, skipping finished trials")
    p.add_argument("spec", type=Path, help="sweep spec YAML (task, backbones, methods and grids, seeds)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for the results database and the report (default: runs/<sweep name>)")
    p.add_argument("--db", type=Path, default=None, metavar="FILE",
                   help="results database (default: DIR/results.sqlite)")
    add_device_argument(p, default=None, when_none="the spec's, else auto")
    p.add_argument("--no-report", action="store_true", help="only run the trials")
    add_loader_arguments(p)
    p.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                   help="each trial saves its training state after every epoch to DIR/<trial hash> (deleted once "
                        "the trial is stored), so a killed sweep resumes its unfinished trial mid-way")
    p.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                   help="save each finished trial's run (tuned weights, logits, record) to DIR/<trial hash>: "
                        "what `lpft soup` averages")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="run trials one after another here or as Ray tasks (pip install 'lpft[ray]'; docs/scale.md)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. auto (default: start a local instance)")
    p.add_argument("--ray-gpus-per-trial", type=float, default=0.0, help="GPUs Ray reserves for each trial")
    add_track_argument(p)
    add_rules_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console
    from lpft.commands.report import parse_rules, print_report
    from lpft.data.loader import loading
    from lpft.results.report import load_results, write_report
    from lpft.results.spec import load_spec
    from lpft.results.sweep import run_sweep
    from lpft.runs.tracking import create_tracker

    tracker = create_tracker(args.track) if args.track else None  # a bad --track fails before any work
    spec = load_spec(args.spec)
    out = args.out or Path("runs") / spec.name
    db = args.db or out / "results.sqlite"
    if args.engine == "ray":
        from lpft.errors import ConfigError
        from lpft.results.ray import run_sweep_ray

        if args.workers is not None or args.skip_bad_images or args.decode != "auto":
            raise ConfigError("--workers, --decode and --skip-bad-images apply to --engine local; a Ray trial reads "
                              "images with its own cores and stops on a bad one")
        summary = run_sweep_ray(spec, db, args.device, address=args.ray_address, gpus_per_trial=args.ray_gpus_per_trial,
                                checkpoint=args.checkpoint, tracker=tracker, keep_runs=args.keep_runs)
    else:
        with loading(args.workers, args.skip_bad_images, args.decode):
            summary = run_sweep(spec, db, args.device, checkpoint=args.checkpoint, tracker=tracker,
                                keep_runs=args.keep_runs)
    console.print(
        f"sweep {spec.name}: {summary.total} trials, {summary.skipped} already finished, {summary.finished} run now, "
        f"{summary.failed} failed ({summary.seconds:.0f}s); results in {db}", markup=False,
    )
    if not args.no_report:
        report = write_report(load_results(db, spec.name), out / "report", parse_rules(args.rules),
                              title=f"lpft sweep: {spec.name}", sweeps=[spec], command=sys.argv, db=db)
        print_report(report)
    return 1 if summary.failed else 0
