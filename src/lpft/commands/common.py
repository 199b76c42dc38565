"""Pieces shared by the run-like sub-commands: hyperparameter flags and result tables."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lpft.distributed import is_main_process
from lpft.experiment import RunRecord
from lpft.finetune import FinetuneConfig

DEFAULTS = FinetuneConfig()


def add_hyperparameter_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fine-tuning (FT and LP-FT)")
    g.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    g.add_argument("--lr", type=float, default=DEFAULTS.lr)
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=DEFAULTS.optimizer)
    g.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    g.add_argument("--bn-mode", choices=["frozen", "train"], default=DEFAULTS.bn_mode,
                   help="BatchNorm during training, the same for FT and LP-FT (default: frozen)")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=DEFAULTS.precision,
                   help="autocast dtype; auto: bf16 on CUDA, on CPU only where it measured faster (docs/scale.md)")
    g.add_argument("--channels-last", choices=["auto", "on", "off"], default=DEFAULTS.channels_last,
                   help="channels_last memory format for image backbones (auto: on)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default=DEFAULTS.compile,
                   help="torch.compile the training step (auto: on CUDA)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def add_backbone_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--backbone", required=default is None, default=default,
                        help="efficientnet-lite0, minilm-l6, timm:<name>, torchvision:<name>, hf:<id-or-path>")
    parser.add_argument("--weights", default=None,
                        help="local weights file, 'random', or 'download' (nothing is downloaded otherwise)")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution for image backbones")


def backbone_options(args: argparse.Namespace) -> dict:
    return {"weights": args.weights, "image_size": args.image_size}


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        batch_size=args.batch_size, bn_mode=args.bn_mode, seed=args.seed,
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
    )


def metrics_table(records: Sequence[RunRecord], title: str) -> Table:
    """Rows = methods; columns = ID val, ID test, each OOD split and the OOD mean (accuracy %)."""
    splits = list(records[0].metrics)
    ood = [s for s in splits if s.startswith("ood/")]
    table = Table(title=title)
    table.add_column("method")
    for s in splits:
        table.add_column({"id_val": "ID val", "id_test": "ID test"}.get(s, s.replace("ood/", "OOD ")), justify="right")
    if len(ood) > 1:
        table.add_column("OOD mean", justify="right")
    table.add_column("ECE id_test", justify="right")
    table.add_column("chosen", justify="left")
    for r in records:
        accs = [100 * r.metrics[s]["accuracy"] for s in splits]
        row = [r.method.upper().replace("LPFT", "LP-FT")] + [f"{a:.1f}" for a in accs]
        if len(ood) > 1:
            row.append(f"{sum(100 * r.metrics[s]['accuracy'] for s in ood) / len(ood):.1f}")
        row.append(f"{r.metrics['id_test']['ece']:.3f}")
        row.append(", ".join(f"{k}={_short(v)}" for k, v in r.selected.items()))
        table.add_row(*row)
    return table


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_json(path: Path | str, payload) -> None:
    """Write ``payload``; under torchrun only rank 0 writes."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


# Tables are wide (one column per OOD split): don't squeeze them to 80 columns when piped.
console = Console(width=None if Console().is_terminal else 160, quiet=not is_main_process())  # torchrun: rank 0 prints
