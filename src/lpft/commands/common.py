"""Pieces shared by the sub-commands: method settings and backbone options as flags, output
options and their old spellings, tables that fit the terminal, and the console.

Nothing heavy is imported at module level: ``lpft <cmd> --help`` builds its parser with this
module, so rich, torch and the registries load inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lpft.config import AUGMENT_PRESETS, DECODE_MODES
from lpft.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from lpft.runs import RunRecord

SETTING_PREFIX = "setting_"  # argparse dest of a method setting's flag
DEFAULT_RULES = "id-val,last-epoch,oracle"
TEXT_MAX_WIDTH = 60  # a text column of a table wraps its cells beyond this many characters


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to the help of each option that has a default, unless the help already
    speaks of its default (a computed one, such as ``runs/<sweep name>``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS  # 0 is set
        optional = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if unset or not optional or "default" in help_text.lower():
            return help_text
        return help_text + " (default: %(default)s)"


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's dest and says, on stderr, what replaces it."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"lpft: warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, replacement: str, dest: str,
                         convert: Callable[[str], Any] = Path) -> None:
    """Keep ``old`` working as a hidden spelling of ``replacement`` (same ``dest``) that warns when used."""
    parser.add_argument(old, dest=dest, type=convert, action=_DeprecatedAlias, replacement=replacement,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = "auto", when_none: str = "") -> None:
    """``--device``: ``auto`` is CUDA when present, else the CPU; ``when_none`` says what an omitted flag means."""
    meaning = f" (default: {when_none})" if when_none else ""
    parser.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N or auto (CUDA when present){meaning}")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of every registered method, from the settings' own declarations.

    Each flag's help says its default and which methods read it; a flag given for a method
    that does not read it is an error (:func:`method_settings`), never silently ignored.
    """
    from lpft.methods import method_class, method_names

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
    add_device_argument(parser)


def method_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The settings given on the command line, parsed for ``method``; a flag it does not read is an error."""
    from lpft.config import parse_text
    from lpft.methods import method_class

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
                        help="efficientnet-lite0, minilm-l6, timm:<name>, torchvision:<name>, hf:<id-or-path>")
    parser.add_argument("--weights", default=None,
                        help="local weights file, 'random', or 'download' (nothing is downloaded otherwise)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input resolution of image backbones, in pixels (default: the backbone's own)")
    parser.add_argument("--augment", choices=AUGMENT_PRESETS, default=None,
                        help="image preprocessing preset: none (resize whole images), or paper (FT and LP-FT "
                             "train on random resized crops + flips; evaluation and LP read the centre crop)")


def backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {"weights": args.weights, "image_size": args.image_size, "augment": args.augment}
    return {k: v for k, v in given.items() if v is not None and not (k == "augment" and v == "none")}


def add_task_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-option", dest="task_options", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of a bundled benchmark, e.g. size=128 for emoji-styles (repeatable)")


def task_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--task-option`` pairs as a dict; values read as YAML scalars (``128`` is a number, ``noto`` text)."""
    import yaml

    out: dict[str, Any] = {}
    for item in args.task_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--task-option {item!r}: write KEY=VALUE, e.g. --task-option size=128")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--decode`` and ``--skip-bad-images``: how image files are read.

    None changes a result, except that ``--decode device`` decodes JPEGs with the device's
    decoder, whose pixels may differ slightly from PIL's on a GPU (docs/scale.md).
    """
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes decoding images while the model computes (default: the cores available; "
                             "0: decode in the training process)")
    parser.add_argument("--decode", choices=DECODE_MODES, default="auto",
                        help="who decodes JPEG files: workers (PIL), or device (the workers only read the bytes; "
                             "each batch is decoded on the training device: nvjpeg on CUDA); auto: workers, "
                             "until device decoding is measured on a GPU")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable training images out, counted in the run record, instead of stopping")


def add_track_argument(parser: argparse.ArgumentParser) -> None:
    """``--track``: log each finished run to an experiment tracker (:func:`lpft.runs.tracking.create_tracker`)."""
    parser.add_argument(
        "--track", default=None, metavar="mlflow[:URI]|tensorboard[:DIR]",
        help="log each finished run to MLflow (default store: ./mlruns) or TensorBoard (default: ./tensorboard-runs); "
             "needs pip install 'lpft[mlflow]' or 'lpft[tensorboard]' (docs/tracking.md)",
    )


def add_rules_argument(parser: argparse.ArgumentParser) -> None:
    """``--rules``: the selection rules of a report, shared by ``sweep``, ``reproduce`` and ``report``."""
    parser.add_argument(
        "--rules", default=DEFAULT_RULES,
        help="comma-separated selection rules, the first one drives the plots: id-val (headline), last-epoch, "
             "oracle or oracle:ood/<name> (always labelled oracle) (default: %(default)s)",
    )


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


def new_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1,
              caption: str | None = None) -> Table:
    """A table of ``rows`` whose first ``text_columns`` columns hold text and the rest numbers.

    Number columns are only as wide as their widest cell (their headers wrap at spaces) and
    text columns at most :data:`TEXT_MAX_WIDTH`, so that on a narrow terminal the text keeps
    whole words; a cell that still does not fit wraps at spaces, then folds. Nothing is cut
    off with an ellipsis.
    """
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for i, name in enumerate(columns):
        if i < text_columns:
            table.add_column(name, overflow="fold", max_width=TEXT_MAX_WIDTH)
        else:
            widest = max([len(row[i]) for row in rows] + [len(word) for word in name.split()])
            table.add_column(name, justify="right", overflow="fold", max_width=widest)
    for row in rows:
        table.add_row(*row)
    return table


def metrics_table(records: Sequence[RunRecord], title: str) -> Table:
    """Accuracy (%) of each method (columns) on each evaluated split (rows), the OOD mean and ID-test ECE.

    One row per split keeps the table narrow however many OOD splits a task has; what each
    method chose on ID validation goes in the caption.
    """
    from lpft.data.splits import ID_TEST, display_name, is_ood
    from lpft.methods import method_label

    splits = list(records[0].metrics)
    ood = [s for s in splits if is_ood(s)]
    labels = [method_label(r.method) for r in records]
    rows = [[display_name(s), *(f"{100 * r.metrics[s]['accuracy']:.1f}" for r in records)] for s in splits]
    if len(ood) > 1:
        rows.append(["OOD mean",
                     *(f"{sum(100 * r.metrics[s]['accuracy'] for s in ood) / len(ood):.1f}" for r in records)])
    rows.append(["ECE on ID (0-1)", *(f"{r.metrics[ID_TEST]['ece']:.3f}" for r in records)])
    chosen = "\n".join(f"{label} chose {', '.join(f'{k}={_short(v)}' for k, v in r.selected.items())}"
                        for label, r in zip(labels, records) if r.selected)
    return new_table(title, ["split", *labels], rows, caption=chosen or None)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_json(path: Path | str, payload: Any) -> None:
    """Write ``payload``; under torchrun only rank 0 writes."""
    from lpft.training.distributed import is_main_process

    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def _make_console() -> Console:
    """Rich's console at the terminal's width ($COLUMNS, else 80 when piped); under torchrun only rank 0 prints."""
    from rich.console import Console

    from lpft.training.distributed import is_main_process

    return Console(quiet=not is_main_process())


def __getattr__(name: str) -> Any:
    """``console`` is built on first use, so that building a parser imports neither rich nor torch."""
    if name == "console":
        globals()["console"] = made = _make_console()
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
