"""The whole report of a results database: tables (Markdown, CSV, HTML), a per-trial CSV and plots, in one folder."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shlex
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lpft.data.splits import ID_TEST, ID_VAL, is_ood
from lpft.diagnostics.wise import plot_wise_curve
from lpft.errors import StoreError
from lpft.results.plots import plot_accuracy_vs_lr, plot_id_vs_ood, slug
from lpft.results.selection import IDValidation, SelectionRule
from lpft.results.spec import SweepSpec
from lpft.results.store import Store, StoredTrial
from lpft.results.tables import (
    CALIBRATION, ResultTable, build_tables, md_escape, method_order, to_html, to_markdown, write_csv,
)
from lpft.runs.record import RunRecord, setting_key

log = logging.getLogger(__name__)

VERSIONS = ("lpft", "torch", "python", "device")  # keys of RunRecord.environment the HTML page shows


def stored_record(stored: StoredTrial) -> RunRecord:
    """A finished trial of the store as the run record it was written from."""
    config = stored.config
    return RunRecord(
        task=stored.task, backbone=config["backbone"], method=stored.method, hyperparameters=config["hyperparameters"],
        selected=stored.selected, metrics=stored.metrics, history=stored.history, timings=stored.timings,
        environment=stored.environment, backbone_options=config["backbone_options"], diagnostics=stored.diagnostics,
        spec=config,
    )


def _selected_trials(group: Sequence[RunRecord], rule: SelectionRule, method: str) -> list[RunRecord]:
    """The trials of the setting ``rule`` chose for ``method`` in one (task, backbone) group, one per seed."""
    chosen = [s for s in rule.select(group) if s.method == method]
    if not chosen:
        return []
    setting = setting_key(chosen[0].hyperparameters)
    return sorted((t for t in group if t.method == method and t.setting == setting), key=lambda t: t.seed)


def load_results(db: Path | str, sweep: str | None = None) -> list[RunRecord]:
    """Every finished trial in ``db`` (optionally of one sweep); the database is opened read-only."""
    if not Path(db).is_file():
        raise StoreError(f"no results database at {db}; run a sweep into it first (lpft sweep SPEC --db {db})")
    with Store(db, readonly=True) as store:
        return [stored_record(t) for t in store.trials("finished", sweep)]


def sweep_names(db: Path | str, sweep: str | None = None) -> list[str]:
    """The sweeps with finished trials in ``db`` (only ``sweep`` when given), in order of their first trial."""
    with Store(db, readonly=True) as store:
        return list(dict.fromkeys(t.sweep for t in store.trials("finished", sweep)))


@dataclass
class Report:
    """Paths of everything :func:`write_report` wrote, and the tables themselves."""

    tables: list[ResultTable]
    markdown: Path
    csv: Path
    html: Path
    images: list[Path]
    trials_csv: Path


def write_report(
    trials: Sequence[RunRecord], out_dir: Path | str, rules: Sequence[SelectionRule] = (IDValidation(),),
    image_prefix: str = "", title: str = "lpft results", *, sweeps: Sequence[SweepSpec | str] = (),
    command: Sequence[str] | str | None = None, db: Path | str | None = None,
) -> Report:
    """Tables (Markdown, CSV, HTML), ``trials.csv`` and plots for ``trials``; the first rule drives the plots.

    The HTML page also says where the numbers come from: ``sweeps`` (the specs that made the
    trials, shown in full, or only their names when the spec is not at hand), the ``command``
    that made the report (``sys.argv``), the database ``db``, and the versions the trials recorded.
    """
    if not trials:
        raise ValueError("no finished trials to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(trials, rules)
    by_setup: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for t in trials:
        by_setup[(t.task, t.backbone_label)].append(t)
    images = []
    for (task, backbone), group in by_setup.items():
        several = sum(t == task for t, _ in by_setup) > 1  # name the backbone only when a task has several
        name = slug(task + (f"_{backbone}" if several else ""))
        table = next(t for t in tables if (t.task, t.backbone, t.rule) == (task, backbone, rules[0].name))
        if table.ood:
            path = out / f"{image_prefix}{name}_id_vs_ood.png"
            plot_id_vs_ood(table, rules[0].select(group), path)
            images.append(path)
            path = out / f"{image_prefix}{name}_accuracy_vs_lr.png"
            if plot_accuracy_vs_lr(group, rules[0], path):
                images.append(path)
            wise = _selected_trials(group, rules[0], "wise-ft")
            if wise:  # the chosen setting's curve per seed: what alpha traded between ID and OOD
                images.append(plot_wise_curve(wise, out / f"{image_prefix}{name}_wise_curve.png"))
    md, csv_path, html_path = out / "results.md", out / "results.csv", out / "results.html"
    trials_path = out / "trials.csv"
    md.write_text(f"# {md_escape(title)}\n\n" + to_markdown(tables))
    write_csv(tables, csv_path)
    write_trials_csv(trials, trials_path)
    specs = [(s.name, spec_yaml(s)) for s in sweeps if isinstance(s, SweepSpec)]
    html_path.write_text(to_html(tables, images, title, report_info(trials, sweeps, command, db), specs))
    log.info("report: %d tables, %d plots, %d trials in %s", len(tables), len(images), len(trials), out)
    return Report(tables, md, csv_path, html_path, images, trials_path)


def report_info(
    trials: Sequence[RunRecord], sweeps: Sequence[SweepSpec | str] = (), command: Sequence[str] | str | None = None,
    db: Path | str | None = None,
) -> list[tuple[str, str]]:
    """(label, value) pairs that say where a report's numbers come from, for its HTML page."""
    started = sorted(_utc(t.environment["started_at"]) for t in trials if t.environment.get("started_at"))
    span = f", started {started[0]}" if started else ""
    if started and started[-1] != started[0]:
        span += f" to {started[-1]}"
    info = [("generated", _utc(datetime.now(timezone.utc).isoformat())), ("trials", f"{len(trials)} finished{span}")]
    names = [s if isinstance(s, str) else s.name for s in sweeps]
    if names:
        info.append(("sweep" if len(names) == 1 else "sweeps", ", ".join(names)))
    if db is not None:
        info.append(("database", str(db)))
    if command is not None:
        info.append(("command", command if isinstance(command, str) else shlex.join(command)))
    info += [(key, _tally(t.environment.get(key) for t in trials)) for key in VERSIONS]
    return info


def _utc(iso: str) -> str:
    """``2026-12-03 09:01 UTC`` from an ISO time with its offset (what records store)."""
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _tally(values: Iterable[str | None]) -> str:
    """``2.4.0``, or ``2.4.0 (40 trials), 2.3.0 (2 trials)`` when trials disagree."""
    counts = Counter("not recorded" if v is None else str(v) for v in values)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} trials)" for v, n in counts.most_common())


def spec_yaml(spec: SweepSpec) -> str:
    """A validated sweep spec as YAML: every method's resolved grid, defaults included."""
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(spec))), sort_keys=False)


def write_trials_csv(trials: Sequence[RunRecord], path: Path) -> None:
    """One row per finished trial, for analyses the tables do not make.

    Columns: task, backbone (its label), method, seed, every hyperparameter as ``hp.<name>``
    (the union over methods; empty where a method lacks it), what the trial selected on ID
    validation as ``selected.<name>`` (epoch, 0 being the starting model; LP's C), then
    ``<split>.<metric>`` at that selection (accuracy and calibration, before and after
    temperature scaling), ``ood_mean.accuracy``, ``weight_change`` (the kept model's backbone
    ``||w - w0|| / ||w0||``), ``fit_seconds`` and ``cpu_seconds``. Rows sorted by task,
    backbone, method, setting, seed.
    """
    hps = sorted({k for t in trials for k in t.hyperparameters if k != "seed"})
    selected = sorted({k for t in trials for k in t.selected})
    splits = sorted({k for t in trials for k in t.metrics}, key=_split_order)
    metrics = {s: sorted({m for t in trials for m in t.metrics.get(s, {})}, key=_metric_order) for s in splits}
    ood_mean = any(is_ood(s) for s in splits)
    header = ["task", "backbone", "method", "seed", *(f"hp.{k}" for k in hps), *(f"selected.{k}" for k in selected),
              *(f"{s}.{m}" for s in splits for m in metrics[s]), *(["ood_mean.accuracy"] if ood_mean else []),
              "weight_change", "fit_seconds", "cpu_seconds"]
    rows = sorted(trials, key=lambda t: (t.task, t.backbone_label, method_order(t.method), t.setting, t.seed))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for t in rows:
            ood = [t.metrics[s]["accuracy"] for s in t.metrics if is_ood(s) and "accuracy" in t.metrics[s]]
            w.writerow([
                t.task, t.backbone_label, t.method, t.seed, *(_cell(t.hyperparameters.get(k)) for k in hps),
                *(_cell(t.selected.get(k)) for k in selected),
                *(_cell(t.metrics.get(s, {}).get(m)) for s in splits for m in metrics[s]),
                *([_cell(float(np.mean(ood)) if ood else None)] if ood_mean else []),
                _cell(t.diagnostics.get("weight_change")), _cell(t.timings.get("fit_seconds")),
                _cell(t.timings.get("cpu_seconds")),
            ])


def _split_order(split: str) -> tuple[int, str]:
    """ID validation, ID test, then the OOD splits by name."""
    return ({ID_VAL: 0, ID_TEST: 1}.get(split, 2), split)


def _metric_order(metric: str) -> tuple[int, str]:
    """Accuracy, then calibration (each before and after temperature scaling), then the rest by name."""
    known = ["accuracy", *(m for name in CALIBRATION for m in (name, f"{name}_ts"))]
    return (known.index(metric), metric) if metric in known else (len(known), metric)


def _cell(value: Any) -> str:
    """A CSV cell: text as it is, numbers and structures as JSON, empty for a missing value."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)
