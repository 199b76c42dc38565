"""The whole report of a results database: tables (Markdown, CSV, HTML) and plots, in one folder."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lpft.errors import StoreError
from lpft.results.plots import plot_accuracy_vs_lr, plot_id_vs_ood, slug
from lpft.results.selection import IDValidation, SelectionRule
from lpft.results.store import Store, StoredTrial
from lpft.results.tables import ResultTable, build_tables, to_html, to_markdown, write_csv
from lpft.runs.record import RunRecord

log = logging.getLogger(__name__)


def stored_record(stored: StoredTrial) -> RunRecord:
    """A finished trial of the store as the run record it was written from."""
    config = stored.config
    return RunRecord(
        task=stored.task, backbone=config["backbone"], method=stored.method, hyperparameters=config["hyperparameters"],
        selected=stored.selected, metrics=stored.metrics, history=stored.history, timings=stored.timings,
        environment=stored.environment, backbone_options=config["backbone_options"], diagnostics=stored.diagnostics,
        spec=config,
    )


def load_results(db: Path | str, sweep: str | None = None) -> list[RunRecord]:
    """Every finished trial in ``db`` (optionally of one sweep); the database is opened read-only."""
    if not Path(db).is_file():
        raise StoreError(f"no results database at {db}; run a sweep into it first (lpft sweep SPEC --db {db})")
    with Store(db, readonly=True) as store:
        return [stored_record(t) for t in store.trials("finished", sweep)]


@dataclass
class Report:
    """Paths of everything :func:`write_report` wrote, and the tables themselves."""

    tables: list[ResultTable]
    markdown: Path
    csv: Path
    html: Path
    images: list[Path]


def write_report(
    trials: Sequence[RunRecord], out_dir: Path | str, rules: Sequence[SelectionRule] = (IDValidation(),),
    image_prefix: str = "", title: str = "lpft results",
) -> Report:
    """Tables (Markdown, CSV, HTML) and plots for ``trials``; the first rule drives the plots."""
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
    md, csv_path, html_path = out / "results.md", out / "results.csv", out / "results.html"
    md.write_text(f"# {title}\n\n" + to_markdown(tables))
    write_csv(tables, csv_path)
    html_path.write_text(to_html(tables, images, title))
    log.info("report: %d tables, %d plots in %s", len(tables), len(images), out)
    return Report(tables, md, csv_path, html_path, images)
