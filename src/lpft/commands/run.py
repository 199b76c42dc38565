"""``lpft run TASK --backbone NAME --method METHOD``: one method on one task."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpft.commands.common import (
    add_backbone_arguments, add_method_arguments, backbone_options, check_writable, console, method_settings,
    metrics_table, write_json,
)
from lpft.methods import method_names
from lpft.runs import RunSpec, execute


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one method on a task and report ID and OOD accuracy")
    p.add_argument("task", help="a bundled benchmark name (lpft data list) or a task YAML file")
    add_backbone_arguments(p)
    p.add_argument("--method", required=True, choices=method_names(registered_order=True))
    add_method_arguments(p)
    p.add_argument("--json", dest="json_path", type=Path,
                   help="write the run record (metrics, settings, history) to this file")
    p.add_argument("--save", type=Path, metavar="DIR",
                   help="also keep what `lpft diagnose` needs in DIR: run.json, logits, tuned weights (safetensors)")
    p.add_argument("--overwrite", action="store_true", help="let --save replace a folder that holds an earlier run")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    spec = RunSpec(args.task, args.backbone, args.method, method_settings(args, args.method),
                   backbone_options=backbone_options(args))
    if args.json_path:
        check_writable(args.json_path, "--json")
    record = execute(spec, args.device, save=args.save, overwrite=args.overwrite)
    console.print(metrics_table([record], f"{record.task} / {record.backbone_label}: accuracy (%)"))
    if args.json_path:
        write_json(args.json_path, record.to_json())
        console.print(f"wrote {args.json_path}")
    if args.save:
        console.print(f"saved the run to {args.save} (diagnose it with `lpft diagnose --run {args.save}`)")
    return 0
