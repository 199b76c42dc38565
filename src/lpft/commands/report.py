"""``lpft report DB``: paper-style tables (Markdown, CSV, HTML) and plots from a results database."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lpft.commands.common import add_rules_argument

if TYPE_CHECKING:
    from rich.table import Table

    from lpft.results.report import Report
    from lpft.results.selection import SelectionRule
    from lpft.results.tables import ResultTable


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and plots from a sweep's results database")
    p.add_argument("db", type=Path, help="the SQLite results database a sweep wrote")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: 'report' beside the database)")
    add_rules_argument(p)
    p.add_argument("--sweep", default=None, help="only trials of this sweep name (default: every sweep)")
    p.set_defaults(func=main)


def parse_rules(text: str) -> list[SelectionRule]:
    from lpft.results.selection import create_rule

    return [create_rule(r.strip()) for r in text.split(",") if r.strip()]


def rich_table(table: ResultTable, width: int | None = None) -> Table:
    """A result table for the terminal; oracle tables are titled and styled as such, and the caption
    carries the table's warnings (too few seeds, clipped intervals). Names are plain text, never
    markup.

    Within ``width`` columns (None: no limit), rather than folding every cell into a tall narrow
    column, columns are left out until the table fits: first the selected settings (then listed
    under the table), then calibration, cost, weight change and the single OOD splits (their
    average stays); the caption names what was left out. The files keep every column.
    """
    from rich.console import Console

    from lpft.results.tables import ECE_HEADERS, EXTRA_HEADERS, OOD_MEAN

    headers = table.headers
    texts = [table.texts(row) for row in table.rows]
    shown = list(range(len(headers)))
    drop_order = [[headers.index(h) for h in ECE_HEADERS], [headers.index(EXTRA_HEADERS[1])],
                  [headers.index(EXTRA_HEADERS[0])]]
    if OOD_MEAN in table.columns:
        drop_order.append([table.columns.index(c) for c in table.ood])
    with_selected = True
    measure = Console(width=10**4).measure
    while True:
        out = _result_table(table, [headers[i] for i in shown], [[t[i] for i in shown] for t in texts], with_selected,
                            [headers[i] for i in range(len(headers)) if i not in shown])
        if width is None or measure(out).maximum <= width:
            return out
        if with_selected:
            with_selected = False
        elif drop_order:
            dropped = drop_order.pop(0)
            shown = [i for i in shown if i not in dropped]
        else:
            return out  # as narrow as it gets: rich folds the cells that remain


def _result_table(table: ResultTable, headers: list[str], texts: list[list[str]], with_selected: bool,
                  left_out: list[str]) -> Table:
    from rich.table import Table
    from rich.text import Text

    from lpft.results.tables import INTERVAL_NOTE

    caption = Text()
    caption.append(INTERVAL_NOTE, style="dim")
    if not with_selected:
        for row in table.rows:
            caption.append(f"\n{row.label}: {row.chosen}")
    if left_out:
        caption.append(f"\nLeft out to fit the terminal: {', '.join(left_out)} (in results.md and results.html).",
                       style="dim")
    for warning in table.warnings:
        caption.append("\n" + warning, style="bold yellow")
    out = Table(title=Text(table.title), title_style="bold red" if table.oracle else "bold", caption=caption,
                caption_style="", caption_justify="left")  # no dim caption style: the warnings stand out
    out.add_column("method", no_wrap=True)  # the row's name stays whole; the value columns fold
    for header in headers:
        out.add_column(Text(header), justify="right", overflow="fold")
    if with_selected:
        out.add_column("selected", overflow="fold")
    out.add_column("seeds", justify="right")
    for row, cells in zip(table.rows, texts):
        out.add_row(*(Text(x) for x in (row.label, *cells, *([row.chosen] if with_selected else []), row.seeds_text)))
    return out


def print_report(report: Report, tables: Sequence[ResultTable] | None = None) -> None:
    from rich.text import Text

    from lpft.commands.common import console

    for table in tables if tables is not None else report.tables:
        console.print(rich_table(table, console.width))
    console.print(Text(f"wrote {report.markdown}, {report.csv}, {report.trials_csv}, {report.html} "
                       f"and {len(report.images)} plot(s)"))


def main(args: argparse.Namespace) -> int:
    from lpft.results.report import load_results, sweep_names, write_report

    out = args.out or args.db.parent / "report"
    report = write_report(load_results(args.db, args.sweep), out, parse_rules(args.rules),
                          title=f"lpft report: {args.db.name}", sweeps=sweep_names(args.db, args.sweep),
                          command=sys.argv, db=args.db)
    print_report(report)
    return 0
