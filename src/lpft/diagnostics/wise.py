"""The WiSE-FT curve of a run: ID test vs mean OOD accuracy as alpha goes from theta_0 to the tuned model.

Reads ``diagnostics["wise_curve"]``, which every ``wise-ft`` run records (and a sweep stores
in its database), so a curve is drawn from a record alone, with no model or data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lpft.data.splits import ID_TEST, is_ood
from lpft.runs.record import RunRecord


def wise_points(record: RunRecord) -> list[tuple[float, float, float]]:
    """``(alpha, ID test accuracy, mean OOD accuracy)`` along the record's curve, alpha ascending."""
    curve = record.diagnostics.get("wise_curve")
    if not curve:
        raise ValueError(f"the {record.method} run on {record.task} has no WiSE-FT curve (diagnostics['wise_curve'])")
    ood = sorted(k for k in curve[0]["accuracy"] if is_ood(k))
    if not ood:
        raise ValueError(f"task {record.task!r} has no OOD split: its WiSE-FT curve has no OOD axis")
    rows = sorted(curve, key=lambda row: row["alpha"])
    return [(row["alpha"], row["accuracy"][ID_TEST], float(np.mean([row["accuracy"][k] for k in ood]))) for row in rows]


def plot_wise_curve(records: Sequence[RunRecord], path: Path | str) -> Path:
    """One PNG: per record, ID test vs mean OOD accuracy along alpha (theta_0 and the tuned end
    labelled), a star at the alpha the run chose on ID validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, record in enumerate(records):
        alphas, id_acc, ood_acc = (np.array(v) for v in zip(*wise_points(record), strict=True))
        color = f"C{i % 10}"
        tune = record.hyperparameters.get("tune", "tuned")
        lr = record.hyperparameters.get("lr")
        label = f"{tune}" + (f", lr {lr:.3g}" if isinstance(lr, float) else "") + f", seed {record.seed}"
        ax.plot(100 * id_acc, 100 * ood_acc, marker="o", ms=3, color=color, label=label)
        ax.annotate("α=0 (LP)", (100 * id_acc[0], 100 * ood_acc[0]), fontsize=7, color=color)
        ax.annotate(f"α=1 ({tune})", (100 * id_acc[-1], 100 * ood_acc[-1]), fontsize=7, color=color)
        chosen = record.selected.get("alpha")
        if chosen in alphas:
            at = int(np.flatnonzero(alphas == chosen)[0])
            ax.scatter([100 * id_acc[at]], [100 * ood_acc[at]], s=140, marker="*", color=color, edgecolor="black",
                       zorder=3)
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel("mean OOD accuracy (%)")
    ax.set_title(f"{records[0].task}: WiSE-FT along α (★ chosen on ID val)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
