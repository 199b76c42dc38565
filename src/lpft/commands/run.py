"""``lpft run TASK --backbone NAME --method lp|ft|lpft``: one method on one task."""

from __future__ import annotations

import argparse
from pathlib import Path

from lpft.commands.common import (
    add_backbone_arguments, add_hyperparameter_arguments, backbone_options, config_from_args, console,
    metrics_table, write_json,
)
from lpft.distortion import run_and_save
from lpft.experiment import run
from lpft.methods import method_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one method on a task and report ID and OOD accuracy")
    p.add_argument("task", help="a bundled benchmark name (emoji-styles, digits) or a task YAML file")
    add_backbone_arguments(p)
    p.add_argument("--method", required=True, choices=method_names())
    add_hyperparameter_arguments(p)
    p.add_argument("--json", dest="json_path", help="write the result (metrics, hyperparameters, history) here")
    p.add_argument("--save", type=Path, metavar="DIR",
                   help="also keep what `lpft diagnose` needs in DIR: run.json, logits, tuned weights (safetensors)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config, options = config_from_args(args), backbone_options(args)
    if args.save:
        record = run_and_save(args.task, args.backbone, args.method, config, args.save, args.device, options)
    else:
        record = run(args.task, args.backbone, args.method, config, args.device, options)
    console.print(metrics_table([record], f"{record.task} / {record.backbone}: accuracy (%)"))
    if args.json_path:
        write_json(args.json_path, record.to_json())
        console.print(f"wrote {args.json_path}")
    if args.save:
        console.print(f"saved the run to {args.save} (diagnose it with `lpft diagnose --run {args.save}`)")
    return 0
