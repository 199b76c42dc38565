"""Paper-style result tables: one per (task, backbone) and selection rule.

Rows are methods (LP, FT, LP-FT, ...), columns ID test accuracy, each OOD split, their mean,
and ID validation (what was selected on), then calibration (ECE before -> after temperature
scaling, ID and OOD). Cells are the mean over seeds ± the half-width of a 90% Student-t
confidence interval (the paper reports 90% intervals over 3 seeds); an interval that runs past
0–100% is shown clipped and marked, and a method with fewer than 3 seeds carries a warning in
every format, because its interval is too wide to mean much (t = 6.31 for 2 seeds). Tables from
an oracle rule say "oracle" in their title, in every row label and in every CSV row. Rendered
here as Markdown (every name escaped), CSV and HTML (a page that reads from 360 px wide up).
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
from lpft.methods.base import POST_HOC_LABELS
from lpft.results.selection import Selection, SelectionRule
from lpft.runs.record import RunRecord

LEVEL = 0.90
MIN_SEEDS = 3  # fewer seeds than this: a visible warning that the interval means little
OOD_MEAN = "ood_mean"  # the column of the mean over OOD splits
CLIPPED_MARK = "†"
FEW_SEEDS_MARK = "⚠"
INTERVAL_NOTE = (
    "Cells: mean over seeds ± half-width of the 90% Student-t confidence interval "
    "(t quantile with n-1 degrees of freedom; '±' is omitted when n = 1)."
)
# The values a metric can take: intervals are clipped to these for display (the CSV keeps the raw half-width).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "ece": (0.0, 1.0), "brier": (0.0, 2.0), "nll": (0.0, math.inf),
    "weight_change": (0.0, math.inf),
}
ECE_HEADERS = ("ECE ID", "ECE OOD")  # table columns after the accuracy columns: see Row.ece_texts
EXTRA_HEADERS = ("Δw", "s/trial (CPU) × trials")  # then distortion and cost: see Row.extra_texts
CALIBRATION = ("ece", "nll", "brier")  # each also after temperature scaling fitted on ID val ("_ts")
CALIBRATION_NOTE = (
    f"ECE: {ECE_BINS}-bin expected calibration error, mean over seeds, before → after temperature scaling "
    "fitted on ID validation (OOD: mean over OOD splits); the CSV adds NLL and Brier with intervals. "
    "'–' where a seed's chosen epoch is not the one its trial kept (only that epoch's calibration is stored)."
)
EXTRA_NOTE = (
    "Δw: how far the method moved the backbone, ||w − w0|| / ||w0|| over all its weights, of each seed's kept "
    "model, mean over seeds (0 for LP; '–' as for ECE, or for trials stored before it was recorded). "
    "Cost: mean wall-clock (CPU) seconds per trial of the method, times the trials it ran: every setting "
    "of its grid, every seed."
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
def few_seeds_warning(n: int) -> str:
    """Why an interval over ``n`` seeds means little; empty from :data:`MIN_SEEDS` seeds on."""
    if n >= MIN_SEEDS:
        return ""
    if n < 2:
        return f"{n} seed: no interval at all, differences between methods may be seed noise"
    t = stats.t.ppf(0.5 + LEVEL / 2, n - 1)
    return f"only {n} seeds: the {LEVEL:.0%} interval (t = {t:.2f}) is too wide to mean much"


@dataclass
class Cell:
    """Mean and raw t-interval half-width of one metric over ``n`` seeds."""

    mean: float
    half: float
    n: int

    def bounds(self, limits: tuple[float, float] = METRIC_RANGES["accuracy"]) -> tuple[float, float]:
        """The interval clipped to ``limits`` (the metric's possible values); NaN without an interval."""
        if math.isnan(self.half):
            return math.nan, math.nan
        return max(limits[0], self.mean - self.half), min(limits[1], self.mean + self.half)

    def clipped(self, limits: tuple[float, float] = METRIC_RANGES["accuracy"]) -> bool:
        """Whether the raw interval runs past ``limits``."""
        return not math.isnan(self.half) and (self.mean - self.half < limits[0] or self.mean + self.half > limits[1])

    def text(self, scale: float = 100.0) -> str:
        """An accuracy cell: ``90.1 ± 1.2``, or ``56.7 (0.0–100.0)†`` when the interval ran past 0–100%."""
        if math.isnan(self.half):
            return f"{scale * self.mean:.1f}"
        if self.clipped():
            low, high = self.bounds()
            return f"{scale * self.mean:.1f} ({scale * low:.1f}–{scale * high:.1f}){CLIPPED_MARK}"
        return f"{scale * self.mean:.1f} ± {scale * self.half:.1f}"


@dataclass
class Row:
    method: str
    label: str
    cells: dict[str, Cell]
    chosen: str
    seeds: list[int]
    calibration: dict[str, Cell | None] = field(default_factory=dict)  # "ece ID", "ece_ts OOD", ...
    weight_change: Cell | None = None
    cost: str = "–"

    def ece_text(self, group: str) -> str:
        before, after = self.calibration.get(f"ece {group}"), self.calibration.get(f"ece_ts {group}")
        return "–" if before is None or after is None else f"{before.mean:.3f} → {after.mean:.3f}"

    def ece_texts(self) -> list[str]:
        """The cells under :data:`ECE_HEADERS`."""
        return [self.ece_text(g) for g in ("ID", "OOD")]

    def extra_texts(self) -> list[str]:
        """The cells under :data:`EXTRA_HEADERS`."""
        return ["–" if self.weight_change is None else f"{100 * self.weight_change.mean:.2g}%", self.cost]

    @property
    def warning(self) -> str:
        """:func:`few_seeds_warning` for this row's seeds."""
        return few_seeds_warning(len(self.seeds))

    @property
    def seeds_text(self) -> str:
        """The seeds cell: their number, marked when too few for a meaningful interval."""
        return f"{len(self.seeds)} {FEW_SEEDS_MARK}" if self.warning else str(len(self.seeds))


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
        """Headers of the value columns: accuracy columns, then calibration, weight change and cost."""
        return [*(column_name(c) for c in self.columns), *ECE_HEADERS, *EXTRA_HEADERS]

    def texts(self, row: Row) -> list[str]:
        """``row``'s cells under :attr:`headers`."""
        return [row.cells[c].text() for c in self.columns] + row.ece_texts() + row.extra_texts()

    @property
    def warnings(self) -> list[str]:
        """What every rendering shows above the table: methods with too few seeds, clipped intervals."""
        by_warning: dict[str, list[str]] = defaultdict(list)
        for row in self.rows:
            if row.warning:
                by_warning[row.warning].append(row.label)
        out = [f"{FEW_SEEDS_MARK} {', '.join(labels)} — {warning}; run {MIN_SEEDS} or more seeds."
               for warning, labels in by_warning.items()]
        if any(row.cells[c].clipped() for row in self.rows for c in self.columns):
            out.append(f"{CLIPPED_MARK} Some intervals ran past 0–100% and are shown clipped, as (low–high); "
                       "results.csv keeps the raw half-widths.")
        return out


def column_name(key: str) -> str:
    return "OOD avg" if key == OOD_MEAN else display_name(key)


def method_order(method: str) -> tuple[int, str]:
    """Sort key: methods in registration order (LP, FT, LP-FT, then later ones), then the post-hoc
    ones (soups), unknown ones last."""
    names = [*method_names(registered_order=True), *POST_HOC_LABELS]
    return (names.index(method), method) if method in names else (len(names), method)


def _chosen(selection: Selection, varied: set[str]) -> str:
    """The chosen setting: hyperparameters that were swept, then the epoch, LP's C, WiSE-FT's alpha or
    a soup's ingredient count of each seed.

    ``lr=0.001; chosen epoch per seed: 2, 0 (start), 3``: per-seed values are labelled as such
    (not "2/3", which reads as "2 of 3"), and epoch 0, the starting model, says so.
    """
    parts = [f"{k}={_fmt(v)}" for k, v in sorted(selection.hyperparameters.items()) if k in varied and v != "auto"]
    epochs = [c.epoch for c in selection.choices]
    if any(e is not None for e in epochs):
        parts.append("chosen epoch per seed: " + ", ".join(_epoch(e) for e in epochs))
    Cs = [c.selected.get("C") for c in selection.choices]
    if selection.hyperparameters.get("C") == "auto" and all(C is not None for C in Cs):
        parts.append("chosen C per seed (auto): " + ", ".join(_fmt(C) for C in Cs))
    for key, what in (("alpha", "chosen alpha per seed"), ("ingredients", "soup ingredients per seed")):
        values = [c.selected.get(key) for c in selection.choices]
        if all(v is not None for v in values):  # WiSE-FT's interpolation weight; a soup's size
            parts.append(f"{what}: " + ", ".join(_fmt(v) for v in values))
    return "; ".join(parts)


def _epoch(epoch: int | None) -> str:
    """An epoch as shown: epoch 0 is the starting model (e.g. LP-FT's probe), kept as a candidate."""
    return "–" if epoch is None else "0 (start)" if epoch == 0 else str(epoch)


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
                                      [c.seed for c in sel.choices], _calibration(sel, ood), _weight_change(sel),
                                      _cost([t for t in group if t.method == sel.method])))
            tables.append(table)
    return tables


def _weight_change(selection: Selection) -> Cell | None:
    values = [c.weight_change for c in selection.choices]
    return None if any(v is None for v in values) else Cell(*t_interval(values), len(values))


def _cost(trials: Sequence[RunRecord]) -> str:
    """``26 (25) × 9``: mean wall (CPU) seconds per trial, times the trials; CPU '?' when not recorded."""
    wall = np.mean([t.timings.get("fit_seconds", math.nan) for t in trials])
    cpu = [t.timings["cpu_seconds"] for t in trials if "cpu_seconds" in t.timings]
    cpu_text = f"{np.mean(cpu):.3g}" if len(cpu) == len(trials) else "?"
    return f"{wall:.3g} ({cpu_text}) × {len(trials)}"


def _varied(trials: Iterable[RunRecord]) -> dict[str, set[str]]:
    """Per method, the hyperparameters that took more than one value (the swept ones)."""
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for t in trials:
        for k, v in t.hyperparameters.items():
            values[t.method][k].add(json.dumps(v))
    return {m: {k for k, vs in hp.items() if len(vs) > 1 or k in ("lr", "C")} for m, hp in values.items()}


_MD_PUNCTUATION = frozenset("\\`*_[]|~#$!")  # what could start code, emphasis, links, cells, headings, math


def md_escape(text: str) -> str:
    """``text`` as literal Markdown inline text that stays inside one table cell or heading.

    Whitespace runs (newlines included) become one space, ``& < >`` HTML entities (no raw
    HTML gets through), and Markdown punctuation is backslash-escaped (``|`` as GFM tables
    require); an underscore inside a word cannot start emphasis and stays as it is.
    """
    text = " ".join(text.split())
    out = []
    for i, ch in enumerate(text):
        if ch in "&<>":
            out.append(html.escape(ch))
        elif ch == "_" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
            out.append(ch)
        elif ch in _MD_PUNCTUATION:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def to_markdown(tables: Sequence[ResultTable]) -> str:
    """Each table under a heading, its warnings as block quotes above it; every name escaped."""
    out = []
    for table in tables:
        header = ["method", *table.headers, "selected hyperparameters", "seeds"]
        out += [f"### {md_escape(table.title)}", ""]
        for warning in table.warnings:
            out += [f"> {md_escape(warning)}", ""]
        out += ["| " + " | ".join(md_escape(h) for h in header) + " |",
                "|" + "|".join([":--", *["--:"] * len(table.headers), ":--", "--:"]) + "|"]
        for row in table.rows:
            cells = [row.label, *table.texts(row), row.chosen, row.seeds_text]
            out.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
        out.append("")
    out.append(INTERVAL_NOTE + " Accuracy in %. " + CALIBRATION_NOTE + " " + EXTRA_NOTE)
    return "\n".join(out) + "\n"


def write_csv(tables: Sequence[ResultTable], path: Path) -> None:
    """Long format: one row per (table, method, column), with the rule and an explicit oracle flag.

    Accuracy columns hold fractions; calibration columns are named ``<metric>[_ts] ID|OOD``, then
    ``weight_change`` (the backbone's relative weight change, a fraction).
    ``mean`` and ``ci90_half_width`` are raw (the half-width may run past the metric's range);
    ``ci90_low_clipped``/``ci90_high_clipped`` are the bounds the tables show, ``clipped`` says
    whether they differ from the raw interval, and ``warning`` is set under :data:`MIN_SEEDS` seeds.
    """
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "backbone", "selection", "oracle", "method", "column", "mean", "ci90_half_width",
                    "ci90_low_clipped", "ci90_high_clipped", "clipped", "n_seeds", "warning", "selected"])
        for t in tables:
            for row in t.rows:
                named = [(column_name(c), "accuracy", row.cells[c]) for c in t.columns]
                named += [(name, name.split(" ")[0].removesuffix("_ts"), cell)  # "ece_ts ID" -> ece
                          for name, cell in row.calibration.items()]
                named.append(("weight_change", "weight_change", row.weight_change))
                for name, metric, cell in named:
                    if cell is None:
                        continue
                    limits = METRIC_RANGES[metric]
                    w.writerow([t.task, t.backbone, t.rule_label, "oracle" if t.oracle else "no", row.label, name,
                                _number(cell.mean), _number(cell.half), *(_number(b) for b in cell.bounds(limits)),
                                "yes" if cell.clipped(limits) else "no", cell.n, row.warning, row.chosen])


def _number(value: float) -> str:
    """A CSV number; empty for NaN (no interval from one seed)."""
    return "" if math.isnan(value) else f"{value:.6f}"


_STYLE = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;line-height:1.45;color:#1d1d1d;
 max-width:1400px;margin:0 auto;padding:1rem clamp(.75rem,3vw,2.5rem) 3rem}
h1{font-size:1.5rem;margin:.5rem 0 1rem}h2{font-size:1.1rem;margin:2rem 0 .5rem}
h1,h2,p,dd,summary,figcaption{overflow-wrap:anywhere}
.meta{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:.15rem 1rem;margin:0 0 1rem;font-size:.9rem}
.meta dt{font-weight:600;color:#555}.meta dd{margin:0}
details{margin:.3rem 0;font-size:.9rem}
pre{overflow-x:auto;background:#f6f6f6;padding:.6rem .8rem;margin:.3rem 0}
.note{font-size:.9rem;color:#444}
.warn{background:#fff4e5;border-left:4px solid #e08a00;padding:.4rem .7rem;margin:.4rem 0;font-size:.9rem}
.scroll{overflow-x:auto;margin:.5rem 0 1.5rem;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.88rem;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .6rem;border-bottom:1px solid #e6e6e6;text-align:right;white-space:nowrap}
th{background:#f3f3f3;white-space:normal;vertical-align:bottom}
th:first-child,td:first-child{text-align:left;position:sticky;left:0;background:#fff;border-right:1px solid #e6e6e6}
th:first-child{background:#f3f3f3}
td.chosen{white-space:normal;min-width:13rem}.chosen{text-align:left}
h2.oracle{color:#a34f00}
table.oracle td{background:#fff6ea}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr));gap:1rem}
figure{margin:0}img{display:block;max-width:100%;height:auto}figcaption{font-size:.85rem;color:#555}
"""


def to_html(
    tables: Sequence[ResultTable], images: Sequence[Path], title: str,
    info: Sequence[tuple[str, str]] = (), specs: Sequence[tuple[str, str]] = (),
) -> str:
    """One page with no external references: ``info`` (label, value) pairs, ``specs`` (name, YAML)
    folded, then the tables with their warnings, the notes, and the plots as data URIs.

    Readable from a 360 px phone to a wide screen: each table scrolls sideways inside its own
    box (its method column stays put), text wraps, plots shrink to the page.
    """
    e = html.escape
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if info:
        parts.append("<dl class='meta'>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in info) + "</dl>")
    parts += [f"<details><summary>sweep spec {e(name)}</summary><pre>{e(text)}</pre></details>" for name, text in specs]
    for t in tables:
        cls = " class='oracle'" if t.oracle else ""
        parts.append(f"<h2{cls}>{e(t.title)}</h2>")
        parts += [f"<p class='warn'>{e(w)}</p>" for w in t.warnings]
        parts.append(f"<div class='scroll'><table{cls}><thead><tr><th>method</th>")
        parts += [f"<th>{e(h)}</th>" for h in t.headers]
        parts.append("<th class='chosen'>selected hyperparameters</th><th>seeds</th></tr></thead><tbody>")
        for row in t.rows:
            cells = "".join(f"<td>{e(x)}</td>" for x in t.texts(row))
            tip = f" title='{e(row.warning)}'" if row.warning else ""
            parts.append(f"<tr><td>{e(row.label)}</td>{cells}<td class='chosen'>{e(row.chosen)}</td>"
                         f"<td{tip}>{e(row.seeds_text)}</td></tr>")
        parts.append("</tbody></table></div>")
    parts.append(f"<p class='note'>{e(INTERVAL_NOTE)} Accuracy in %. Headline numbers use ID-validation selection. "
                 f"{e(CALIBRATION_NOTE)} {e(EXTRA_NOTE)}</p><div class='figures'>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(f"<figure><img alt='{e(image.stem)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(image.stem)}</figcaption></figure>")
    parts.append("</div></body></html>")
    return "\n".join(parts)
