"""``lpft diagnose --run DIR [--run DIR ...]``: feature distortion and calibration of saved runs.

Each DIR comes from ``lpft run ... --save DIR``. Several runs (e.g. FT and LP-FT on the
same task) are compared in one table and one figure; the JSON holds every number.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from lpft.commands.common import console, write_json
from lpft.diagnostics import diagnose_run, plot_diagnoses
from lpft.errors import ConfigError
from lpft.runs import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="feature change, weight change, first-step gradients and calibration of saved runs")
    p.add_argument("--run", dest="runs", action="append", required=True, type=Path,
                   help="a run directory written by `lpft run --save`; repeat to compare runs")
    p.add_argument("--label", dest="labels", action="append", default=[],
                   help="legend name per --run, in order (default: method and learning rate)")
    p.add_argument("--out", type=Path, default=Path("runs/diagnose"), help="writes diagnose.json and diagnose.png here")
    p.add_argument("--max-examples", type=int, default=None,
                   help="cap each split at a seeded random subset of this many examples (faster)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"give one --label per --run ({len(args.runs)} runs, {len(args.labels)} labels)")
    device = resolve_device(args.device)
    labels = args.labels or [None] * len(args.runs)
    diagnoses = [diagnose_run(r, device, args.max_examples, label=lab) for r, lab in zip(args.runs, labels)]
    json_path, png_path = args.out / "diagnose.json", args.out / "diagnose.png"
    write_json(json_path, {"runs": diagnoses})
    plot_diagnoses(diagnoses, png_path)
    console.print(split_table(diagnoses))
    console.print(run_table(diagnoses))
    console.print(f"wrote {json_path} and {png_path}")
    return 0


def split_table(diagnoses: list[dict]) -> Table:
    """Per run and split: feature change and calibration before / after temperature scaling."""
    table = Table(title="feature change and calibration per split (TS = temperature scaled on id_val)")
    for col in ("run", "split", "feat. change x100", "rel. change x100", "cos dist", "CKA", "acc %",
                "ECE", "ECE TS", "NLL", "NLL TS", "Brier", "Brier TS"):
        table.add_column(col, justify="left" if col in ("run", "split") else "right")
    for d in diagnoses:
        for split, fc in d["feature_change"].items():
            c = d["calibration"][split]
            table.add_row(
                d["label"], split, f"{100 * fc['mean_sq_change']:.3g}", f"{100 * fc['relative_change']:.3g}",
                f"{fc['cosine_distance']:.4f}", f"{fc['cka']:.4f}", f"{100 * c['accuracy']:.1f}",
                f"{c['ece']:.3f}", f"{c['ece_ts']:.3f}", f"{c['nll']:.3f}", f"{c['nll_ts']:.3f}",
                f"{c['brier']:.3f}", f"{c['brier_ts']:.3f}",
            )
    return table


def run_table(diagnoses: list[dict]) -> Table:
    """Per run: OOD/ID change ratio, weight change, head norm and the first FT step."""
    table = Table(title="per run")
    for col in ("run", "OOD/ID change", "weight change", "head norm", "T (id_val)",
                "step-0 loss", "step-0 |grad| head", "step-0 |grad| all"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for d in diagnoses:
        ratios = ", ".join(f"{r['mean_sq_change']:.3g}" for r in d["ood_id_ratio"].values()) or "-"
        first = d["first_step"] or {}
        fmt = lambda key: f"{first[key]:.4g}" if key in first else "-"  # noqa: E731
        head = f"{d['head']['norm']:.3g}" if d["head"] else "-"
        table.add_row(
            d["label"], ratios, f"{d['weight_change']['total']:.3g}", head,
            f"{d['calibration']['id_val']['temperature']:.3g}",
            fmt("loss"), fmt("grad_norm_head"), fmt("grad_norm_total"),
        )
    return table
