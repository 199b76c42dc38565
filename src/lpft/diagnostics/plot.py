"""Figures of diagnosed runs: feature change per split, weight change per block, reliability diagrams."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpft.data.splits import display_name


def plot_diagnoses(diagnoses: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """One PNG: relative feature change per split and run, weight change per block, and
    a reliability diagram (ID test vs each OOD split, before temperature scaling) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(diagnoses)
    cols = max(2, n)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.6), squeeze=False)
    splits = [k for k in diagnoses[0]["feature_change"]]
    width = 0.8 / n
    ax = axes[0, 0]
    values = []
    for i, d in enumerate(diagnoses):
        ys = [100 * d["feature_change"][s]["relative_change"] for s in splits]
        values += [y for y in ys if y > 0]
        ax.bar(np.arange(len(splits)) + (i - (n - 1) / 2) * width, ys, width, label=d["label"])
    ax.set_xticks(np.arange(len(splits)), [display_name(s) for s in splits], rotation=20)
    ax.set_ylabel("relative feature change x100")
    ax.set_title("feature change: ||f - f0||² / ||f0||²")
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for d in diagnoses:
        blocks = d["weight_change"]["blocks"]
        ax.plot(range(len(blocks)), [b["relative_change"] for b in blocks], marker=".", label=d["label"])
    if any(b["relative_change"] > 0 for d in diagnoses for b in d["weight_change"]["blocks"]):
        ax.set_yscale("log")
    ax.set_xlabel("block (input -> output)")
    ax.set_ylabel("||w - w0|| / ||w0||")
    ax.set_title("weight change per block")
    ax.legend(fontsize=8)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for i, d in enumerate(diagnoses):
        ax = axes[1, i]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for key, bins in d["reliability"].items():
            conf, acc = np.asarray(bins["before"]["confidence"]), np.asarray(bins["before"]["accuracy"])
            ok = np.isfinite(conf)
            ece = d["calibration"][key]["ece"]
            ax.plot(conf[ok], acc[ok], marker="o", ms=3, label=f"{key.replace('ood/', 'OOD ')} (ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability: {d['label']}")
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[1, n:]:
        ax.axis("off")
    fig.suptitle(f"{diagnoses[0]['task']} / {diagnoses[0]['backbone']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
