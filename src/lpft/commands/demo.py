"""``lpft demo``: LP, FT and LP-FT on the bundled emoji-styles benchmark, one ID/OOD table.

Sized for a 2-core CPU (EfficientNet-Lite0 at 64 px, a few epochs) so it finishes in
minutes; the learning rates follow the paper's rule that LP-FT takes a smaller one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lpft.commands.common import console, metrics_table, write_json
from lpft.runs import RunSpec, execute, resolve_device
from lpft.runs.pipeline import load_task_once


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="LP vs FT vs LP-FT on emoji-styles (ID: noto; OOD: three other vendors)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="emoji-styles")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--ft-lr", type=float, default=3e-3)
    p.add_argument("--lpft-lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="JSON results go here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = resolve_device(args.device)
    with console.status(f"preparing {args.task} (first run renders it; later runs read the cache)"):
        task = load_task_once(args.task)
    console.print(task.summary())
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
    console.print(f"wall time {time.perf_counter() - start:.0f}s; results in {args.out}/")
    return 0
