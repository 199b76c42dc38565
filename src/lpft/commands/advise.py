"""``lpft advise TASK --backbone B``: before paying for fine-tuning, is LP-FT expected to beat FT OOD, and why."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from lpft.commands.common import add_backbone_arguments, add_device_argument, add_task_option_argument

    p = sub.add_parser("advise", help="predict, before training, whether LP-FT will beat FT out of distribution")
    p.add_argument("task", help="a bundled benchmark name or a task YAML file")
    add_task_option_argument(p)
    add_backbone_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random head compared with the probe's")
    add_device_argument(p)
    p.add_argument("--json", dest="json_path", type=Path, metavar="FILE",
                   help="also write the measurements to this file")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import backbone_options, check_writable, console, new_table, task_options, write_json
    from lpft.data.splits import display_name
    from lpft.diagnostics.regime import GOOD_FEATURES, assess
    from lpft.runs import resolve_device
    from lpft.runs.pipeline import check_modality, create_backbone_once, load_task_once

    if args.json_path:
        check_writable(args.json_path, "--json")
    task = load_task_once(args.task, task_options(args))
    backbone = create_backbone_once(args.backbone, backbone_options(args))
    check_modality(task, backbone)
    report = assess(task, backbone, resolve_device(args.device), args.seed)
    rows = [
        ["probe accuracy, id_val", f"{100 * report.probe_accuracy:.1f}%"],
        ["majority-class rate, id_val", f"{100 * report.majority_rate:.1f}%"],
        [f"normalised probe accuracy (good >= {GOOD_FEATURES})", f"{report.normalised_accuracy:.2f}"],
        ["first-step backbone gradient, probe head / random head", f"{report.gradient_ratio:.3g}"],
        *([f"energy outside the training span, {display_name(key)}", f"{100 * value:.1f}%"]
          for key, value in report.out_of_span.items()),
    ]
    table = new_table(f"{task.name} / {backbone.name}: before fine-tuning", ["measure", "value"], rows)
    console.print(table)
    winner = "LP-FT is expected to beat FT out of distribution" if report.verdict == "lpft" else \
        "FT is expected to do at least as well as LP-FT out of distribution"
    console.print(f"[bold]{winner}[/bold], because:")
    for reason in report.reasons:
        console.print(f"  - {reason}")
    if args.json_path:
        write_json(args.json_path, report.to_json())
    return 0
