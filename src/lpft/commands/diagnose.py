"""``lpft diagnose --run DIR [--run DIR ...]``: feature distortion and calibration of saved runs.

Each DIR comes from ``lpft run ... --out DIR``. Several runs (e.g. FT and LP-FT on the
same task) are compared in the same tables and one figure; the JSON holds every number.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from lpft.commands.common import add_device_argument

if TYPE_CHECKING:
    from rich.table import Table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="feature change, weight change, first-step gradients and calibration of saved runs")
    p.add_argument("--run", dest="runs", action="append", required=True, type=Path, metavar="DIR",
                   help="a run folder written by `lpft run --out DIR`; repeat to compare runs")
    p.add_argument("--label", dest="labels", action="append", default=[], metavar="LABEL",
                   help="legend name per --run, in order (default: method and learning rate)")
    p.add_argument("--out", type=Path, default=Path("runs/diagnose"), metavar="DIR",
                   help="folder for diagnose.json and diagnose.png")
    p.add_argument("--max-examples", type=int, default=None,
                   help="cap each split at a seeded random subset of this many examples (faster)")
    add_device_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lpft.commands.common import console, write_json
    from lpft.diagnostics import diagnose_run, plot_diagnoses
    from lpft.errors import ConfigError
    from lpft.runs import resolve_device

    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"give one --label per --run ({len(args.runs)} runs, {len(args.labels)} labels)")
    device = resolve_device(args.device)
    labels = args.labels or [None] * len(args.runs)
    diagnoses = [diagnose_run(r, device, args.max_examples, label=lab) for r, lab in zip(args.runs, labels)]
    json_path, png_path = args.out / "diagnose.json", args.out / "diagnose.png"
    write_json(json_path, {"runs": diagnoses})
    plot_diagnoses(diagnoses, png_path)
    console.print(change_table(diagnoses))
    for diagnosis in diagnoses:
        console.print(calibration_table(diagnosis))
    console.print(run_table(diagnoses))
    console.print(f"wrote {json_path} and {png_path}", markup=False)
    return 0


def change_table(diagnoses: list[dict]) -> Table:
    """Per run and split: how far the features moved from the pretrained backbone's."""
    from lpft.commands.common import new_table
    from lpft.data.splits import display_name

    rows = [[d["label"], display_name(split), f"{100 * fc['mean_sq_change']:.3g}",
             f"{100 * fc['relative_change']:.3g}", f"{fc['cosine_distance']:.4f}", f"{fc['cka']:.4f}"]
            for d in diagnoses for split, fc in d["feature_change"].items()]
    columns = ["run", "split", "feat. change x100", "rel. change x100", "cos dist", "CKA"]
    return new_table("feature change per split", columns, rows, text_columns=2)


def calibration_table(diagnosis: dict) -> Table:
    """Per split of one run: accuracy and calibration before and after temperature scaling.

    One table per run: with a run column the table would not fit 80 columns.
    """
    from lpft.commands.common import new_table
    from lpft.data.splits import display_name

    rows = []
    for split in diagnosis["feature_change"]:
        c = diagnosis["calibration"][split]
        rows.append([display_name(split), f"{100 * c['accuracy']:.1f}",
                     *(f"{c[key]:.3f}" for key in ("ece", "ece_ts", "nll", "nll_ts", "brier", "brier_ts"))])
    return new_table(f"calibration of {diagnosis['label']} (TS: temperature-scaled on ID val)",
                     ["split", "acc %", "ECE", "ECE TS", "NLL", "NLL TS", "Brier", "Brier TS"], rows)


def run_table(diagnoses: list[dict]) -> Table:
    """Per run: OOD/ID change ratio, weight change, head norm and the first FT step."""
    from lpft.commands.common import new_table

    rows = []
    for d in diagnoses:
        first = d["first_step"] or {}
        fmt = lambda key: f"{first[key]:.4g}" if key in first else "-"  # noqa: E731
        rows.append([
            d["label"], ", ".join(f"{r['mean_sq_change']:.3g}" for r in d["ood_id_ratio"].values()) or "-",
            f"{d['weight_change']['total']:.3g}", f"{d['head']['norm']:.3g}" if d["head"] else "-",
            f"{d['calibration']['id_val']['temperature']:.3g}",
            fmt("loss"), fmt("grad_norm_head"), fmt("grad_norm_total"),
        ])
    return new_table("per run", ["run", "OOD/ID change", "weight change", "head norm", "T (ID val)", "step-0 loss",
                                 "step-0 |grad| head", "step-0 |grad| all"], rows)
