"""Paper-style result tables: one per (task, backbone) and selection rule.

Rows are methods (LP, FT, LP-FT, ...), columns ID test accuracy, each OOD split, their mean,
and ID validation (what was selected on), then calibration (ECE before -> after temperature
scaling, ID and OOD). Cells are the mean over seeds ± the half-width of a 90% Student-t
confidence interval (the paper reports 90% intervals over 3 seeds). Tables from an oracle
rule say "oracle" in their title, in every row label and in every CSV row. Rendered here as
Markdown, CSV and HTML.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from lpft.data.splits import ID_TEST, ID_VAL, display_name, is_ood
from lpft.evaluation.metrics import ECE_BINS
from lpft.methods import method_label, method_names
from lpft.results.selection import Selection, SelectionRule
from lpft.runs.record import RunRecord

LEVEL = 0.90
OOD_MEAN = "ood_mean"  # the column of the mean over OOD splits
INTERVAL_NOTE = (
    "Cells: mean over seeds ± half-width of the 90% Student-t confidence interval "
    "(t quantile with n-1 degrees of freedom; '±' is omitted when n = 1)."
)
ECE_HEADERS = ("ECE ID", "ECE OOD")  # table columns after the accuracy columns: see Row.ece_texts
CALIBRATION = ("ece", "nll", "brier")  # each also after temperature scaling fitted on ID val ("_ts")
CALIBRATION_NOTE = (
    f"ECE: {ECE_BINS}-bin expected calibration error, mean over seeds, before → after temperature scaling "
    "fitted on ID validation (OOD: mean over OOD splits); the CSV adds NLL and Brier with intervals. "
    "'–' where a seed's chosen epoch is not the one its trial kept (only that epoch's calibration is stored)."
)



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
    def ood(self) -> list[str]:
        """The OOD split columns."""
        return [c for c in self.columns if is_ood(c)]

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
    return "OOD avg" if key == OOD_MEAN else display_name(key)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: methods in registration order (LP, FT, LP-FT, then later ones), unknown ones last."""
    names = method_names(registered_order=True)
    return (names.index(method), method) if method in names else (len(names), method)


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
            for group, splits in (("ID", [ID_TEST]), ("OOD", list(ood))):
                per_split = [selection.metric(k, metric) for k in splits]
                if not splits or any(v is None for v in per_split):
                    out[f"{metric} {group}"] = None
                    continue
                values = np.mean(per_split, axis=0)
                out[f"{metric} {group}"] = Cell(*t_interval(values), len(values))
    return out


def build_tables(trials: Sequence[RunRecord], rules: Sequence[SelectionRule]) -> list[ResultTable]:
    """Tables for every (task, backbone), in the order of ``rules`` within each."""
    by_setup: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for t in trials:
        by_setup[(t.task, t.backbone_label)].append(t)
    tables = []
    for (task, backbone), group in by_setup.items():
        ood = [k for k in group[0].metrics if is_ood(k)]
        columns = [ID_TEST, *ood, *([OOD_MEAN] if len(ood) > 1 else []), ID_VAL]
        varied = _varied(group)
        for rule in rules:
            table = ResultTable(task, backbone, rule.name, rule.label, rule.oracle, columns)
            for sel in sorted(rule.select(group), key=lambda s: method_order(s.method)):
                per_seed = {k: sel.accuracies(k) for k in columns if k != OOD_MEAN}
                if OOD_MEAN in columns:
                    per_seed[OOD_MEAN] = list(np.mean([per_seed[k] for k in ood], axis=0))
                cells = {k: Cell(*t_interval(v), len(v)) for k, v in per_seed.items()}
                label = method_label(sel.method) + (" (oracle)" if rule.oracle else "")
                table.rows.append(Row(sel.method, label, cells, _chosen(sel, varied.get(sel.method, set())),
                                      [c.seed for c in sel.choices], _calibration(sel, ood)))
            tables.append(table)
    return tables


def _varied(trials: Iterable[RunRecord]) -> dict[str, set[str]]:
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


