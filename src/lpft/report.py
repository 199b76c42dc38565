"""Paper-style tables and plots from the results database.

One table per (task, backbone) and selection rule: rows are methods (LP, FT, LP-FT, ...),
columns ID test accuracy, each OOD split, their mean, and ID validation (what was
selected on), then calibration (ECE before -> after temperature scaling, ID and OOD).
Cells are the mean over seeds ± the half-width of a 90% Student-t confidence interval
(the paper reports 90% intervals over 3 seeds). Tables from the OOD-oracle rule say
"oracle" in their title, in every row label and in every CSV row.

Written as Markdown, CSV and one self-contained HTML page (plots inlined), plus PNGs:
ID vs OOD accuracy per method (a point per seed and the mean) and accuracy vs learning rate.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from lpft.selection import ID_VAL, IDValidation, Selection, SelectionRule, TrialResult
from lpft.store import Store, StoredTrial

log = logging.getLogger(__name__)

LEVEL = 0.90
METHOD_LABELS = {"lp": "LP", "ft": "FT", "lpft": "LP-FT"}
METHOD_ORDER = ("lp", "ft", "lpft")
METHOD_COLORS = {"lp": "C0", "ft": "C1", "lpft": "C2"}
INTERVAL_NOTE = (
    "Cells: mean over seeds ± half-width of the 90% Student-t confidence interval "
    "(t quantile with n-1 degrees of freedom; '±' is omitted when n = 1)."
)
ECE_HEADERS = ("ECE ID", "ECE OOD")  # table columns after the accuracy columns: see Row.ece_texts
CALIBRATION = ("ece", "nll", "brier")  # each also after temperature scaling fitted on ID val ("_ts")
CALIBRATION_NOTE = (
    "ECE: 15-bin expected calibration error, mean over seeds, before → after temperature scaling "
    "fitted on ID validation (OOD: mean over OOD splits); the CSV adds NLL and Brier with intervals. "
    "'–' where a seed's chosen epoch is not the one its trial kept (only that epoch's calibration is stored)."
)


# ---------------------------------------------------------------------- loading
def backbone_label(name: str, options: dict[str, Any]) -> str:
    """``efficientnet-lite0 (image_size=64)``: the backbone and the options that change it."""
    shown = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if v is not None)
    return f"{name} ({shown})" if shown else name


def trial_result(stored: StoredTrial) -> TrialResult:
    """A finished trial from the store, in the form selection rules read."""
    config = stored.config
    hyper = {k: v for k, v in config["hyperparameters"].items() if k != "seed"}
    return TrialResult(
        task=stored.task, backbone=backbone_label(config["backbone"], config["backbone_options"]),
        method=stored.method, hyperparameters=hyper, seed=stored.seed, metrics=stored.metrics,
        history=stored.history, selected=stored.selected,
    )


def load_results(db: Path | str, sweep: str | None = None) -> list[TrialResult]:
    """Every finished trial in ``db`` (optionally of one sweep)."""
    if not Path(db).exists():
        raise FileNotFoundError(f"no results database at {db}")
    with Store(db) as store:
        return [trial_result(t) for t in store.trials("finished", sweep)]


# ---------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t interval; half-width NaN for one value."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return mean, float(half)


# ---------------------------------------------------------------------- tables
@dataclass
class Cell:
    mean: float
    half: float
    n: int

    def text(self, scale: float = 100.0) -> str:
        if math.isnan(self.half):
            return f"{scale * self.mean:.1f}"
        return f"{scale * self.mean:.1f} ± {scale * self.half:.1f}"


@dataclass
class Row:
    method: str
    label: str
    cells: dict[str, Cell]
    chosen: str
    seeds: list[int]
    calibration: dict[str, Cell | None] = field(default_factory=dict)  # "ece ID", "ece_ts OOD", ...

    def ece_text(self, group: str) -> str:
        before, after = self.calibration.get(f"ece {group}"), self.calibration.get(f"ece_ts {group}")
        return "–" if before is None or after is None else f"{before.mean:.3f} → {after.mean:.3f}"

    def ece_texts(self) -> list[str]:
        """The cells under :data:`ECE_HEADERS`."""
        return [self.ece_text(g) for g in ("ID", "OOD")]


@dataclass
class ResultTable:
    """One (task, backbone, rule) table; ``columns`` are split keys plus ``ood_mean`` when >1 OOD split."""

    task: str
    backbone: str
    rule: str
    rule_label: str
    oracle: bool
    columns: list[str]
    rows: list[Row] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.oracle:
            return f"{self.task} / {self.backbone} — ORACLE, {self.rule_label}: an upper bound, not a fair estimate"
        return f"{self.task} / {self.backbone} — selection: {self.rule_label}"

    @property
    def headers(self) -> list[str]:
        """Headers of the value columns: accuracy columns, then calibration."""
        return [*(column_name(c) for c in self.columns), *ECE_HEADERS]

    def texts(self, row: Row) -> list[str]:
        """``row``'s cells under :attr:`headers`."""
        return [row.cells[c].text() for c in self.columns] + row.ece_texts()


def column_name(key: str) -> str:
    if key == "id_test":
        return "ID"
    if key == ID_VAL:
        return "ID val"
    if key == "ood_mean":
        return "OOD avg"
    return "OOD " + key.removeprefix("ood/")


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), method) if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _chosen(selection: Selection, varied: set[str]) -> str:
    """The chosen setting: hyperparameters that were swept, then per-seed epoch or LP C."""
    parts = [f"{k}={_fmt(v)}" for k, v in sorted(selection.hyperparameters.items()) if k in varied and v != "auto"]
    epochs = [c.epoch for c in selection.choices]
    if any(e is not None for e in epochs):
        parts.append("epoch " + "/".join(str(e) for e in epochs))
    Cs = [c.selected.get("C") for c in selection.choices]
    if selection.hyperparameters.get("C") == "auto" and all(C is not None for C in Cs):
        parts.append("C (auto) " + "/".join(_fmt(C) for C in Cs))
    return ", ".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _calibration(selection: Selection, ood: Sequence[str]) -> dict[str, Cell | None]:
    """Per calibration metric, before and after temperature scaling: ID test and the OOD mean over seeds."""
    out: dict[str, Cell | None] = {}
    for name in CALIBRATION:
        for metric in (name, f"{name}_ts"):
            for group, splits in (("ID", ["id_test"]), ("OOD", list(ood))):
                per_split = [selection.metric(k, metric) for k in splits]
                if not splits or any(v is None for v in per_split):
                    out[f"{metric} {group}"] = None
                    continue
                values = np.mean(per_split, axis=0)
                out[f"{metric} {group}"] = Cell(*t_interval(values), len(values))
    return out


def build_tables(trials: Sequence[TrialResult], rules: Sequence[SelectionRule]) -> list[ResultTable]:
    """Tables for every (task, backbone), in the order of ``rules`` within each."""
    by_setup: dict[tuple[str, str], list[TrialResult]] = defaultdict(list)
    for t in trials:
        by_setup[(t.task, t.backbone)].append(t)
    tables = []
    for (task, backbone), group in by_setup.items():
        splits = [k for k in group[0].metrics if k != ID_VAL]
        ood = [k for k in splits if k.startswith("ood/")]
        columns = ["id_test", *ood, *(["ood_mean"] if len(ood) > 1 else []), ID_VAL]
        varied = _varied(group)
        for rule in rules:
            table = ResultTable(task, backbone, rule.name, rule.label, rule.oracle, columns)
            for sel in sorted(rule.select(group), key=lambda s: _method_key(s.method)):
                per_seed = {k: sel.accuracies(k) for k in columns if k != "ood_mean"}
                if "ood_mean" in columns:
                    per_seed["ood_mean"] = list(np.mean([per_seed[k] for k in ood], axis=0))
                cells = {k: Cell(*t_interval(v), len(v)) for k, v in per_seed.items()}
                label = METHOD_LABELS.get(sel.method, sel.method) + (" (oracle)" if rule.oracle else "")
                table.rows.append(Row(sel.method, label, cells, _chosen(sel, varied.get(sel.method, set())),
                                      [c.seed for c in sel.choices], _calibration(sel, ood)))
            tables.append(table)
    return tables


def _varied(trials: Iterable[TrialResult]) -> dict[str, set[str]]:
    """Per method, the hyperparameters that took more than one value (the swept ones)."""
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for t in trials:
        for k, v in t.hyperparameters.items():
            values[t.method][k].add(json.dumps(v))
    return {m: {k for k, vs in hp.items() if len(vs) > 1 or k in ("lr", "C")} for m, hp in values.items()}


def to_markdown(tables: Sequence[ResultTable]) -> str:
    out = []
    for table in tables:
        header = ["method", *table.headers, "selected hyperparameters", "seeds"]
        out += [f"### {table.title}", "", "| " + " | ".join(header) + " |",
                "|" + "|".join([":--", *["--:"] * len(table.headers), ":--", "--:"]) + "|"]
        for row in table.rows:
            out.append("| " + " | ".join([row.label, *table.texts(row), row.chosen, str(len(row.seeds))]) + " |")
        out.append("")
    out.append(INTERVAL_NOTE + " Accuracy in %. " + CALIBRATION_NOTE)
    return "\n".join(out) + "\n"


def write_csv(tables: Sequence[ResultTable], path: Path) -> None:
    """Long format: one row per (table, method, column), with the rule and an explicit oracle flag.

    Accuracy columns hold fractions; calibration columns are named ``<metric>[_ts] ID|OOD``.
    """
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "backbone", "selection", "oracle", "method", "column", "mean", "ci90_half_width",
                    "n_seeds", "selected"])
        for t in tables:
            for row in t.rows:
                named = [(column_name(c), row.cells[c]) for c in t.columns] + list(row.calibration.items())
                for name, cell in named:
                    if cell is None:
                        continue
                    w.writerow([t.task, t.backbone, t.rule_label, "oracle" if t.oracle else "no", row.label,
                                name, f"{cell.mean:.6f}", "" if math.isnan(cell.half) else f"{cell.half:.6f}",
                                cell.n, row.chosen])


def to_html(tables: Sequence[ResultTable], images: Sequence[Path], title: str) -> str:
    """One page with no external references: tables, the interval note and the plots as data URIs."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:nth-last-child(2){text-align:left}"
             ".oracle{background:#fff3e0}.oracle caption{color:#b35900;font-weight:bold}caption{text-align:left}"
             "img{max-width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(INTERVAL_NOTE)} Accuracy in %. Headline numbers use ID-validation selection. "
             f"{html.escape(CALIBRATION_NOTE)}</p>"]
    for t in tables:
        cls = " class='oracle'" if t.oracle else ""
        parts.append(f"<table{cls}><caption>{html.escape(t.title)}</caption><tr><th>method</th>")
        parts += [f"<th>{html.escape(h)}</th>" for h in t.headers]
        parts.append("<th>selected hyperparameters</th><th>seeds</th></tr>")
        for row in t.rows:
            cells = "".join(f"<td>{html.escape(x)}</td>" for x in t.texts(row))
            parts.append(f"<tr><td>{html.escape(row.label)}</td>{cells}<td>{html.escape(row.chosen)}</td>"
                         f"<td>{len(row.seeds)}</td></tr>")
        parts.append("</table>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<figure><img alt='{html.escape(image.stem)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(image.stem)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-")


def _color(method: str) -> str:
    return METHOD_COLORS.get(method, "C3")


def plot_id_vs_ood(table: ResultTable, selections: Sequence[Selection], path: Path) -> None:
    """ID test vs mean OOD accuracy: one small point per seed, one large marker per method mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood = [c for c in table.columns if c.startswith("ood/")]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for sel in sorted(selections, key=lambda s: _method_key(s.method)):
        color = _color(sel.method)
        x = 100 * np.array(sel.accuracies("id_test"))
        y = 100 * np.mean([sel.accuracies(k) for k in ood], axis=0)
        ax.scatter(x, y, s=18, color=color, alpha=0.5)
        ax.scatter([x.mean()], [y.mean()], s=120, color=color, marker="*", edgecolor="black",
                   label=f"{METHOD_LABELS.get(sel.method, sel.method)} (mean of {len(x)})")
    ax.set_xlabel("ID test accuracy (%)")
    ax.set_ylabel("OOD accuracy (%)" + (f", mean of {len(ood)} splits" if len(ood) > 1 else f", {ood[0]}"))
    ax.set_title(f"{table.task}: ID vs OOD ({table.rule_label} selection)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_lr(trials: Sequence[TrialResult], rule: SelectionRule, path: Path) -> bool:
    """ID test and mean OOD accuracy vs learning rate per method (epoch chosen by ``rule``); LP as lines.

    When other hyperparameters were swept too, each lr shows its best setting by the rule.
    Returns False (and writes nothing) when no method swept a learning rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood = sorted({k for t in trials for k in t.metrics if k.startswith("ood/")})
    by_method: dict[str, dict[float, list[TrialResult]]] = defaultdict(lambda: defaultdict(list))
    for t in trials:
        if "lr" in t.hyperparameters:
            by_method[t.method][float(t.hyperparameters["lr"])].append(t)
    if not by_method:
        return False
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in sorted(by_method, key=_method_key):
        color = _color(method)
        lrs = sorted(by_method[method])
        series: dict[str, list[tuple[float, float]]] = {"id_test": [], "ood": []}
        for lr in lrs:
            sel = rule.select(by_method[method][lr])[0]
            id_acc = 100 * np.array(sel.accuracies("id_test"))
            ood_acc = 100 * np.mean([sel.accuracies(k) for k in ood], axis=0)
            series["id_test"].append(t_interval(id_acc))
            series["ood"].append(t_interval(ood_acc))
        name = METHOD_LABELS.get(method, method)
        for key, fmt, what in (("id_test", "o-", "ID"), ("ood", "s--", "OOD")):
            mean, half = np.array(series[key]).T
            ax.errorbar(lrs, mean, yerr=np.nan_to_num(half), fmt=fmt, color=color, capsize=3,
                        label=f"{name} {what}")
    for t_lp in [t for t in trials if t.method == "lp"][:1]:
        lp = [t for t in trials if t.method == "lp" and t.setting == t_lp.setting]
        ax.axhline(100 * np.mean([t.metrics["id_test"]["accuracy"] for t in lp]), color=_color("lp"), ls="-", lw=1, label="LP ID")
        ax.axhline(100 * np.mean([np.mean([t.metrics[k]["accuracy"] for k in ood]) for t in lp]), color=_color("lp"), ls="--",
                   lw=1, label="LP OOD")
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


# ---------------------------------------------------------------------- the whole report
@dataclass
class Report:
    """Paths of everything :func:`write_report` wrote, and the tables themselves."""

    tables: list[ResultTable]
    markdown: Path
    csv: Path
    html: Path
    images: list[Path]


def write_report(
    trials: Sequence[TrialResult], out_dir: Path | str, rules: Sequence[SelectionRule] = (IDValidation(),),
    image_prefix: str = "", title: str = "lpft results",
) -> Report:
    """Tables (Markdown, CSV, HTML) and plots for ``trials``; the first rule drives the plots."""
    if not trials:
        raise ValueError("no finished trials to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(trials, rules)
    by_setup: dict[tuple[str, str], list[TrialResult]] = defaultdict(list)
    for t in trials:
        by_setup[(t.task, t.backbone)].append(t)
    images = []
    for (task, backbone), group in by_setup.items():
        several = sum(t == task for t, _ in by_setup) > 1  # name the backbone only when a task has several
        slug = _slug(task + (f"_{backbone}" if several else ""))
        table = next(t for t in tables if (t.task, t.backbone, t.rule) == (task, backbone, rules[0].name))
        if any(c.startswith("ood/") for c in table.columns):
            path = out / f"{image_prefix}{slug}_id_vs_ood.png"
            plot_id_vs_ood(table, rules[0].select(group), path)
            images.append(path)
        path = out / f"{image_prefix}{slug}_accuracy_vs_lr.png"
        if any(c.startswith("ood/") for c in table.columns) and plot_accuracy_vs_lr(group, rules[0], path):
            images.append(path)
    md, csv_path, html_path = out / "results.md", out / "results.csv", out / "results.html"
    md.write_text(f"# {title}\n\n" + to_markdown(tables))
    write_csv(tables, csv_path)
    html_path.write_text(to_html(tables, images, title))
    log.info("report: %d tables, %d plots in %s", len(tables), len(images), out)
    return Report(tables, md, csv_path, html_path, images)
