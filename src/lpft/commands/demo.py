"""``lpft demo``: LP, FT and LP-FT on the bundled emoji-styles benchmark, one ID/OOD table.

Sized for a 2-core CPU (EfficientNet-Lite0 at 64 px, a few epochs) so it finishes in
minutes; the learning rates follow the paper's rule that LP-FT takes a smaller one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lpft.commands.common import add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="LP vs FT vs LP-FT on emoji-styles (ID: noto; OOD: three other vendors)")
    p.add_argument("--task", default="emoji-styles", help="a bundled benchmark name or a task YAML file")
    p.add_argument("--backbone", default="efficientnet-lite0", help="the backbone all three methods start from")
    p.add_argument("--image-size", type=int, default=64, help="input resolution, in pixels")
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs of FT and LP-FT")
    p.add_argument("--ft-lr", type=float, default=3e-3, help="FT's learning rate")
    p.add_argument("--lpft-lr", type=float, default=3e-4, help="LP-FT's learning rate (smaller, as in the paper)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of every method")
    add_device_argument(p)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                   help="folder for the run records (lp.json, ft.json, lpft.json)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console, metrics_table, write_json
    from lpft.runs import RunSpec, execute, resolve_device
    from lpft.runs.pipeline import load_task_once

    start = time.perf_counter()
    device = resolve_device(args.device)
    console.print(f"loading {args.task} (the first run prepares it; later runs read the cache)", markup=False)
    task = load_task_once(args.task)
    console.print(task.summary(), markup=False)
    finetune = {"epochs": args.epochs, "batch_size": args.batch_size, "eval_all_splits_each_epoch": False}
    settings = {"lp": {}, "ft": {**finetune, "lr": args.ft_lr}, "lpft": {**finetune, "lr": args.lpft_lr}}
    records = []
    for method, values in settings.items():
        console.rule(f"{method.upper()} ({args.backbone}, {args.image_size}px, {device})")
        spec = RunSpec(args.task, args.backbone, method, {**values, "seed": args.seed},
                       backbone_options={"image_size": args.image_size})
        record = execute(spec, device)
        write_json(args.out / f"{method}.json", record.to_json())
        records.append(record)
    console.print(metrics_table(records, f"{task.name} / {records[0].backbone_label}: accuracy (%)"))
    console.print(f"wall time {time.perf_counter() - start:.0f}s; results in {args.out}/", markup=False)
    return 0
