"""Pieces shared by the run-like sub-commands: method settings as flags, backbone flags, result tables."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lpft.config import parse_text
from lpft.data.splits import ID_TEST, display_name, is_ood
from lpft.errors import ConfigError
from lpft.methods import method_class, method_label, method_names
from lpft.runs import RunRecord
from lpft.training.distributed import is_main_process

SETTING_PREFIX = "setting_"  # argparse dest of a method setting's flag


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of every registered method, from the settings' own declarations.

    Each flag's help says its default and which methods read it; a flag given for a method
    that does not read it is an error (:func:`method_settings`), never silently ignored.
    """
    owners: dict[str, list[str]] = {}
    declared: dict[str, Any] = {}
    for name in method_names(registered_order=True):
        for setting, field in method_class(name).config_class.settings().items():
            owners.setdefault(setting, []).append(name)
            declared.setdefault(setting, field)
    group = parser.add_argument_group("method settings (each flag lists the methods that read it)")
    for setting, field in declared.items():
        meta = field.metadata
        group.add_argument(
            flag(setting), dest=SETTING_PREFIX + setting, default=None, choices=meta["choices"],
            metavar=None if meta["choices"] else ("auto|" if meta["auto"] else "") + meta["kind"].__name__.upper(),
            help=f"{meta['help']} (default: {field.default}; {', '.join(owners[setting])})",
        )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA when present (default: auto)")


def method_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The settings given on the command line, parsed for ``method``; a flag it does not read is an error."""
    config_class = method_class(method).config_class
    given = {k.removeprefix(SETTING_PREFIX): v for k, v in vars(args).items() if k.startswith(SETTING_PREFIX) and v is not None}
    foreign = sorted(set(given) - set(config_class.settings()))
    if foreign:
        reads = ", ".join(flag(s) for s in config_class.settings())
        verb = "does" if len(foreign) == 1 else "do"
        raise ConfigError(f"{', '.join(flag(s) for s in foreign)} {verb} not apply to --method {method}; it reads {reads}")
    return {name: parse_text(config_class, name, text) for name, text in given.items()}


def add_backbone_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--backbone", required=default is None, default=default,
                        help="efficientnet-lite0, minilm-l6, timm:<name>, torchvision:<name>, hf:<id-or-path>"
                             + (f" (default: {default})" if default else ""))
    parser.add_argument("--weights", default=None,
                        help="local weights file, 'random', or 'download' (nothing is downloaded otherwise)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input resolution for image backbones (default: the backbone's own)")


def backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in {"weights": args.weights, "image_size": args.image_size}.items() if v is not None}


def check_writable(path: Path | str, what: str) -> Path:
    """Fail before any work when an output file cannot be written (its folder is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder of {what} {path}: {exc.strerror}") from exc
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write {what} {path}: permission denied; choose another path")
    return path


def metrics_table(records: Sequence[RunRecord], title: str) -> Table:
    """Rows = methods; columns = each evaluated split, the OOD mean, ID-test ECE and what was chosen (accuracy %)."""
    splits = list(records[0].metrics)
    ood = [s for s in splits if is_ood(s)]
    table = Table(title=title)
    table.add_column("method")
    for s in splits:
        table.add_column(display_name(s), justify="right")
    if len(ood) > 1:
        table.add_column("OOD mean", justify="right")
    table.add_column("ECE ID", justify="right")
    table.add_column("chosen", justify="left")
    for r in records:
        row = [method_label(r.method)] + [f"{100 * r.metrics[s]['accuracy']:.1f}" for s in splits]
        if len(ood) > 1:
            row.append(f"{sum(100 * r.metrics[s]['accuracy'] for s in ood) / len(ood):.1f}")
        row.append(f"{r.metrics[ID_TEST]['ece']:.3f}")
        row.append(", ".join(f"{k}={_short(v)}" for k, v in r.selected.items()))
        table.add_row(*row)
    return table


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_json(path: Path | str, payload: Any) -> None:
    """Write ``payload``; under torchrun only rank 0 writes."""
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


# Tables are wide (one column per OOD split): don't squeeze them to 80 columns when piped.
console = Console(width=None if Console().is_terminal else 160, quiet=not is_main_process())  # torchrun: rank 0 prints

