"""``lpft predict RUN INPUTS.csv``: score new data with a run saved by ``lpft run --out RUN``."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from lpft.commands.common import add_deprecated_alias, add_device_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict classes for new inputs with a saved run")
    p.add_argument("run", type=Path, help="a run folder written by `lpft run ... --out DIR`")
    p.add_argument("inputs", type=Path,
                   help="a CSV with the task's input column (text, or path for images, relative to the CSV); "
                        "a label column, if present, is scored")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write the predictions to this CSV (default: <inputs>.predictions.csv beside the inputs)")
    add_deprecated_alias(p, "--out", "--csv", dest="csv")
    add_device_argument(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from lpft.commands.common import check_writable, console
    from lpft.data.files import INPUT_COLUMN, read_csv
    from lpft.data.task import Split
    from lpft.evaluation.metrics import softmax
    from lpft.data.loader import SplitData
    from lpft.runs import resolve_device
    from lpft.runs.artifacts import load_model, load_run
    from lpft.training import predict_logits

    out = check_writable(args.csv or args.inputs.with_suffix(".predictions.csv"), "--csv")
    model, classes = load_model(args.run)
    temperature = load_run(args.run).record.metrics.get("id_val", {}).get("temperature", 1.0)
    modality = model.backbone.modality
    rows = read_csv(args.inputs, modality, labelled=False)
    inputs = rows.inputs if modality == "text" else [args.inputs.parent / p for p in rows.inputs]
    split = Split("predict", inputs, np.zeros(len(inputs), dtype=np.int64), str(args.inputs))
    logits = predict_logits(model, SplitData(model.backbone, split), resolve_device(args.device))
    probs = softmax(logits / temperature)
    predicted = probs.argmax(1)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([INPUT_COLUMN[modality], "predicted", "confidence", *(f"p({c})" for c in classes)])
        for value, k, p in zip(rows.inputs, predicted, probs):
            writer.writerow([value, classes[k], f"{p[k]:.4f}", *(f"{x:.4f}" for x in p)])
    console.print(f"wrote {len(predicted)} predictions to {out} "
                  f"(probabilities temperature-scaled, T={temperature:.3g})", markup=False)
    if all(rows.labels):
        known = [label in classes for label in rows.labels]
        hits = [classes[k] == label for k, label in zip(predicted, rows.labels)]
        console.print(f"accuracy on the given labels: {100 * np.mean(hits):.1f}% ({sum(known)} of {len(known)} "
                      "labels are classes of the run)")
    return 0
