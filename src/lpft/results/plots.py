"""Plots of a report: ID vs OOD accuracy per method, and accuracy vs learning rate."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lpft.data.splits import ID_TEST, is_ood
from lpft.methods import method_label
from lpft.results.selection import Selection, SelectionRule
from lpft.results.tables import ResultTable, method_order, t_interval
from lpft.runs.record import RunRecord


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
COLORS = (*(f"C{i}" for i in range(10)), "#222222", "#b8860b")  # matplotlib's ten, then two more: 12 methods apart


def _color(method: str) -> str:
    """One colour per method, stable across plots: its place in the method order."""
    return COLORS[method_order(method)[0] % len(COLORS)]


def _marker(method: str) -> str:
    """One marker shape per method (as its colour), so overlapping points stay tellable apart."""
    return MARKERS[method_order(method)[0] % len(MARKERS)]


def plot_id_vs_ood(table: ResultTable, selections: Sequence[Selection], path: Path) -> None:
    """ID test vs mean OOD accuracy: one small point per seed, one large marker per method mean.

    Each method has its own marker shape and colour; points are translucent with solid edges,
    so points that coincide (e.g. LP's identical seeds) or overlap remain visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood = table.ood
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for sel in sorted(selections, key=lambda s: method_order(s.method)):
        color, marker = _color(sel.method), _marker(sel.method)
        x = 100 * np.array(sel.accuracies(ID_TEST))
        y = 100 * np.mean([sel.accuracies(k) for k in ood], axis=0)
        ax.scatter(x, y, s=28, marker=marker, facecolor=color, edgecolor=color, linewidth=1, alpha=0.45)
        ax.scatter([x.mean()], [y.mean()], s=150, marker=marker, facecolor=color, edgecolor="black", linewidth=1.2,
                   alpha=0.8, zorder=3, label=f"{method_label(sel.method)} (mean of {len(x)} seeds)")
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel("OOD accuracy (%)" + (f", mean of {len(ood)} splits" if len(ood) > 1 else f", {ood[0]}"))
    ax.set_title(f"{table.task}: ID vs OOD ({table.rule_label} selection)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="small: one seed", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_lr(trials: Sequence[RunRecord], rule: SelectionRule, path: Path) -> bool:
    """ID test and mean OOD accuracy vs learning rate per method (epoch chosen by ``rule``), with
    90% t-intervals clipped to 0–100%; methods without a learning rate (LP) as horizontal lines.

    When other hyperparameters were swept too, each lr shows its best setting by the rule.
    Returns False (and writes nothing) when no method swept a learning rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood = sorted({k for t in trials for k in t.metrics if is_ood(k)})
    by_method: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        if "lr" in t.hyperparameters:
            by_method[t.method][float(t.hyperparameters["lr"])].append(t)
    if not by_method:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in sorted(by_method, key=method_order):
        color = _color(method)
        lrs = sorted(by_method[method])
        series: dict[str, list[tuple[float, float]]] = {ID_TEST: [], "ood": []}
        for lr in lrs:
            sel = rule.select(by_method[method][lr])[0]
            id_acc = 100 * np.array(sel.accuracies(ID_TEST))
            ood_acc = 100 * np.mean([sel.accuracies(k) for k in ood], axis=0)
            series[ID_TEST].append(t_interval(id_acc))
            series["ood"].append(t_interval(ood_acc))
        name = method_label(method)
        for key, ls, face, what in ((ID_TEST, "-", color, "ID"), ("ood", "--", "white", "OOD")):  # OOD: open markers
            mean, half = np.array(series[key]).T
            half = np.nan_to_num(half)  # the bars are clipped to 0–100%, as the tables' intervals
            yerr = [mean - np.maximum(mean - half, 0.0), np.minimum(mean + half, 100.0) - mean]
            ax.errorbar(lrs, mean, yerr=yerr, marker=_marker(method), ls=ls, color=color, capsize=3, alpha=0.85,
                        markerfacecolor=face, markeredgecolor=color, label=f"{name} {what}")
    flat = sorted({t.method for t in trials if "lr" not in t.hyperparameters}, key=method_order)
    for method in flat:
        first = next(t for t in trials if t.method == method)
        runs = [t for t in trials if t.method == method and t.setting == first.setting]
        name, color = method_label(method), _color(method)
        ax.axhline(100 * np.mean([t.metrics[ID_TEST]["accuracy"] for t in runs]), color=color, ls="-", lw=1,
                   label=f"{name} ID")
        ax.axhline(100 * np.mean([np.mean([t.metrics[k]["accuracy"] for k in ood]) for t in runs]), color=color,
                   ls="--", lw=1, label=f"{name} OOD")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("accuracy (%)" + (" (OOD: mean of splits)" if len(ood) > 1 else ""))
    ax.set_title(f"{trials[0].task}: accuracy vs learning rate ({rule.label} epochs; 90% t-interval)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
