"""``lpft run TASK --backbone NAME --method METHOD``: one method on one task."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpft.commands.common import (
    add_backbone_arguments, add_deprecated_alias, add_loader_arguments, add_method_arguments, add_task_option_argument,
    add_track_argument,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lpft.methods import method_names  # the registry: --method's choices, and a flag per setting below

    p = sub.add_parser("run", help="run one method on a task and report ID and OOD accuracy")
    p.add_argument("task", help="a bundled benchmark name (lpft data list) or a task YAML file")
    add_task_option_argument(p)
    add_backbone_arguments(p)
    p.add_argument("--method", required=True, choices=method_names(registered_order=True))
    add_method_arguments(p)
    add_loader_arguments(p)
    p.add_argument("--json", dest="json_path", type=Path, metavar="FILE",
                   help="write the run record (metrics, settings, history) to this file")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="keep the run in DIR for `lpft diagnose` and `lpft predict`: run.json, logits, "
                        "tuned weights (safetensors)")
    add_deprecated_alias(p, "--save", "--out", dest="out")
    p.add_argument("--overwrite", action="store_true", help="let --out replace a folder that holds an earlier run")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="save the training state to DIR after every epoch; the same command again resumes "
                        "after the last saved epoch (DIR is kept; docs/scale.md)")
    add_track_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import (
        backbone_options, check_writable, console, method_settings, metrics_table, task_options, write_json,
    )
    from lpft.data.loader import loading
    from lpft.runs import RunSpec, execute
    from lpft.runs.tracking import create_tracker, log_safely

    tracker = create_tracker(args.track) if args.track else None  # a bad --track fails before any work
    spec = RunSpec(args.task, args.backbone, args.method, method_settings(args, args.method),
                   task_options=task_options(args), backbone_options=backbone_options(args))
    if args.json_path:
        check_writable(args.json_path, "--json")
    with loading(args.workers, args.skip_bad_images, args.decode):
        record = execute(spec, args.device, save=args.out, overwrite=args.overwrite, checkpoint=args.checkpoint)
    console.print(metrics_table([record], f"{record.task} / {record.backbone_label}: accuracy (%)"))
    if args.json_path:
        write_json(args.json_path, record.to_json())
        console.print(f"wrote {args.json_path}", markup=False)
    for split, rows in record.diagnostics.get("skipped_images", {}).items():
        console.print(f"skipped {len(rows)} unreadable {split} image(s), e.g. {rows[0]}", markup=False)
    if args.out:
        console.print(f"saved the run to {args.out} (diagnose it with `lpft diagnose --run {args.out}`)", markup=False)
    if tracker is not None:  # last: the run's own outputs are written whatever the tracker does
        log_safely(tracker, record, record.task)
    return 0
