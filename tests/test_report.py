"""Reports: t-intervals, paper-shaped tables, oracle labelling, self-contained HTML, plots, CLI."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest

from lpft.cli import main as cli_main
from lpft.results.report import write_report
from lpft.results.selection import IDValidation, LastEpoch, OODOracle
from lpft.results.store import Store
from lpft.results.sweep import Trial
from lpft.results.tables import build_tables, md_escape, t_interval, to_markdown
from lpft.runs import RunRecord


def trial(method: str, seed: int, lr: float | None, epochs: list[tuple[float, float, float, float]]) -> RunRecord:
    """Per epoch (id_val, id_test, ood/a, ood/b) accuracies; LP (lr None) has one final result."""
    keys = ("id_val", "id_test", "ood/a", "ood/b")
    best = max(range(len(epochs)), key=lambda i: (epochs[i][0], -i))
    metrics = {k: {"accuracy": v, "ece": 0.1} for k, v in zip(keys, epochs[best])}
    if lr is None:
        return RunRecord("toy", "bb", method, {"C": "auto", "seed": seed}, {"C": 1.0}, metrics, [{"C": 1.0}])
    history = [{"epoch": e, "accuracy": dict(zip(keys, accs))} for e, accs in enumerate(epochs, 1)]
    return RunRecord("toy", "bb", method, {"lr": lr, "epochs": len(epochs), "seed": seed}, {"epoch": best + 1}, metrics,
                     history)


TRIALS = [
    *(trial("lp", s, None, [(0.80, 0.78 + 0.01 * s, 0.60, 0.62)]) for s in range(3)),
    *(trial("ft", s, 1e-3, [(0.85, 0.84, 0.50, 0.52), (0.90, 0.89 + 0.01 * s, 0.45, 0.47)]) for s in range(3)),
    *(trial("ft", s, 1e-2, [(0.70, 0.70, 0.65, 0.66), (0.75, 0.74, 0.60, 0.61)]) for s in range(3)),
    *(trial("lpft", s, 1e-4, [(0.91, 0.90, 0.66, 0.68), (0.92, 0.91 + 0.005 * s, 0.64, 0.66)]) for s in range(3)),
]
RULES = [IDValidation(), LastEpoch(), OODOracle()]


def test_t_interval_matches_hand_computation():
    mean, half = t_interval([1.0, 2.0, 3.0])
    # t_{0.95, 2} = 2.919986; sd = 1
    assert mean == 2.0 and half == pytest.approx(2.919986 / math.sqrt(3), rel=1e-5)
    assert math.isnan(t_interval([0.5])[1])
    assert t_interval([0.7, 0.7, 0.7])[1] == pytest.approx(0.0, abs=1e-12)


def test_table_has_papers_shape_and_id_val_selection():
    headline, last, oracle = build_tables(TRIALS, RULES)
    assert headline.columns == ["id_test", "ood/a", "ood/b", "ood_mean", "id_val"]
    assert [r.label for r in headline.rows] == ["LP", "FT", "LP-FT"]
    ft = headline.rows[1]
    assert ft.cells["id_test"].mean == pytest.approx(0.90) and ft.cells["ood_mean"].mean == pytest.approx(0.46)
    assert ft.cells["id_test"].n == 3 and ft.cells["id_test"].half > 0
    assert ft.chosen == "lr=0.001; chosen epoch per seed: 2, 2, 2"
    assert headline.rows[0].chosen == "chosen C per seed (auto): 1, 1, 1"
    # the oracle prefers the lr with the better OOD accuracy, at epoch 1
    assert oracle.rows[1].chosen == "lr=0.01; chosen epoch per seed: 1, 1, 1"
    assert not any(t.warnings for t in (headline, last, oracle))  # 3 seeds, intervals inside 0-100%
    assert last.rows[1].cells["ood/a"].mean == pytest.approx(0.45)


def test_oracle_numbers_are_marked_everywhere(tmp_path):
    report = write_report(TRIALS, tmp_path, RULES, image_prefix="t_")
    markdown = report.markdown.read_text()
    sections = markdown.split("### ")[1:]
    assert len(sections) == 3
    assert "oracle" not in sections[0].lower() and "oracle" not in sections[1].lower()
    assert "ORACLE" in sections[2].splitlines()[0]
    oracle_rows = [line for line in sections[2].splitlines() if line.startswith("| ") and "method" not in line]
    assert len(oracle_rows) == 3 and all("(oracle)" in row for row in oracle_rows)
    assert "90% Student-t" in markdown

    with report.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["oracle"] for r in rows if "oracle" in r["selection"]} == {"oracle"}
    assert all(r["oracle"] == "no" for r in rows if "oracle" not in r["selection"])
    assert all("(oracle)" in r["method"] for r in rows if r["oracle"] == "oracle")

    page = report.html.read_text()
    assert "class='oracle'" in page and page.count("(oracle)") == 3
    assert "http" not in page.replace("http-equiv", "") and page.count("data:image/png;base64,") == 2
    names = sorted(p.name for p in report.images)
    assert names == ["t_toy_accuracy_vs_lr.png", "t_toy_id_vs_ood.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in report.images)


def test_markdown_is_deterministic():
    assert to_markdown(build_tables(TRIALS, RULES)) == to_markdown(build_tables(list(TRIALS), RULES))


def test_report_command_reads_the_database(tmp_path, capsys):
    db = tmp_path / "results.sqlite"
    with Store(db) as store:
        for t in TRIALS:
            config = {"task": "toy", "task_options": {}, "backbone": "bb", "backbone_options": {}, "method": t.method,
                      "hyperparameters": {**t.hyperparameters, "seed": t.seed}}
            h = Trial(config).hash
            store.register("toy-sweep", h, config)
            assert store.claim(h)
            store.mark_finished(h, task_name="toy", selected=dict(t.selected), metrics=dict(t.metrics),
                                history=list(t.history), timings={}, environment={})
    assert cli_main(["report", str(db), "--rules", "id-val,oracle:ood/a"]) == 0
    out = capsys.readouterr().out
    assert "ORACLE" in out and "LP-FT" in out
    text = (tmp_path / "report" / "results.md").read_text()
    assert "oracle (selected on ood/a test accuracy)" in text
    page = (tmp_path / "report" / "results.html").read_text()
    assert "<dt>sweep</dt><dd>toy-sweep</dd>" in page and f"<dt>database</dt><dd>{db}</dd>" in page
    assert "<dt>command</dt>" in page and (tmp_path / "report" / "trials.csv").is_file()


def test_calibration_columns_come_from_the_kept_epoch():
    """ECE (before -> after temperature scaling) is shown where the rule's epoch is the one the
    trial kept (its metrics hold calibration), and '–' where it is not (history has accuracy only)."""
    def with_ts(t: RunRecord, ece: float) -> RunRecord:
        metrics = {k: {**m, "ece": ece, "ece_ts": ece / 2} for k, m in t.metrics.items()}
        return dataclasses.replace(t, metrics=metrics)

    trials = [with_ts(t, 0.1 + 0.01 * t.seed) for t in TRIALS]
    headline, last, oracle = build_tables(trials, RULES)
    for row in headline.rows:
        assert row.calibration["ece ID"].mean == pytest.approx(0.11) and row.calibration["ece_ts OOD"].mean == pytest.approx(0.055)
        assert row.ece_text("ID") == "0.110 → 0.055"
        assert row.calibration["nll ID"] is None  # these trials stored no NLL
    # FT at lr 1e-3 kept epoch 2 (best ID val); the oracle picks lr 1e-2 at epoch 1, which the trial did not keep
    assert oracle.rows[1].ece_text("OOD") == "–" and oracle.rows[0].ece_text("OOD") == "0.110 → 0.055"
    markdown = to_markdown([headline, oracle])
    assert "| ECE ID | ECE OOD |" in markdown and "0.110 → 0.055" in markdown and "–" in markdown


# Two seeds that disagree: raw 90% intervals run far past 0-100% (t = 6.31 with one degree of freedom).
TWO_SEEDS = [trial("ft", 0, 1e-3, [(0.50, 0.20, 0.30, 0.30)]), trial("ft", 1, 1e-3, [(0.90, 0.93, 0.90, 0.90)])]


def test_wide_intervals_are_clipped_and_few_seeds_warned_in_every_format(tmp_path):
    (table,) = build_tables(TWO_SEEDS, [IDValidation()])
    (row,) = table.rows
    cell = row.cells["id_test"]
    assert cell.half > cell.mean  # the raw interval runs below 0
    assert table.texts(row)[0] == "56.5 (0.0–100.0)†" and cell.bounds() == (0.0, 1.0)
    assert row.seeds_text == "2 ⚠" and "t = 6.31" in row.warning
    assert [w[0] for w in table.warnings] == ["⚠", "†"] and "FT — only 2 seeds" in table.warnings[0]

    report = write_report(TWO_SEEDS, tmp_path, [IDValidation()])
    markdown = report.markdown.read_text()
    assert "> ⚠ FT — only 2 seeds: the 90% interval (t = 6.31) is too wide to mean much" in markdown
    assert "| 56.5 (0.0–100.0)† |" in markdown and "| 2 ⚠ |" in markdown and "> † Some intervals" in markdown
    page = report.html.read_text()
    assert "<p class='warn'>⚠ FT — only 2 seeds" in page and "56.5 (0.0–100.0)†" in page
    with report.csv.open() as f:
        rows = {r["column"]: r for r in csv.DictReader(f)}
    raw = rows["ID"]
    assert float(raw["ci90_half_width"]) == pytest.approx(cell.half, abs=1e-6)  # raw, not clipped
    assert (raw["ci90_low_clipped"], raw["ci90_high_clipped"], raw["clipped"]) == ("0.000000", "1.000000", "yes")
    assert "only 2 seeds" in raw["warning"] and rows["ece ID"]["clipped"] == "no"

    from rich.console import Console

    from lpft.commands.report import rich_table

    console = Console(record=True, width=200)
    console.print(rich_table(table))
    terminal = console.export_text()
    assert "⚠ FT — only 2 seeds" in terminal and "56.5 (0.0–100.0)†" in terminal and "2 ⚠" in terminal


def test_three_seeds_have_no_warning_and_one_seed_says_there_is_no_interval():
    (three,) = build_tables(TRIALS[:3], [IDValidation()])
    assert three.warnings == [] and three.rows[0].warning == "" and three.rows[0].seeds_text == "3"
    (one,) = build_tables(TRIALS[:1], [IDValidation()])
    assert one.texts(one.rows[0])[0] == "78.0" and one.warnings == ["⚠ LP — 1 seed: no interval at all, "
                                                                    "differences between methods may be seed noise; "
                                                                    "run 3 or more seeds."]


def test_epoch_zero_is_the_start():
    """The starting model (LP-FT's probe) is a candidate epoch, shown as such."""
    def lpft(seed: int, id_val: list[float]) -> RunRecord:
        history = [{"epoch": e, "accuracy": {"id_val": v, "id_test": v, "ood/a": 0.5}} for e, v in enumerate(id_val)]
        kept = max(history, key=lambda h: h["accuracy"]["id_val"])
        return RunRecord("toy", "bb", "lpft", {"lr": 1e-4, "seed": seed}, {"epoch": kept["epoch"]},
                         {k: {"accuracy": a} for k, a in kept["accuracy"].items()}, history)

    (table,) = build_tables([lpft(0, [0.9, 0.8]), lpft(1, [0.9, 0.7]), lpft(2, [0.8, 0.9])], [IDValidation()])
    assert table.rows[0].chosen == "lr=0.0001; chosen epoch per seed: 0 (start), 0 (start), 1"


def test_trials_csv_has_one_row_per_trial_with_every_setting(tmp_path):
    trials = [dataclasses.replace(t, timings={"fit_seconds": 1.5, "cpu_seconds": 2.5},
                                  diagnostics={"weight_change": 0.0 if t.method == "lp" else 0.01}) for t in TRIALS]
    report = write_report(trials, tmp_path, [IDValidation()])
    with report.trials_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(TRIALS)
    assert list(rows[0])[:10] == ["task", "backbone", "method", "seed", "hp.C", "hp.epochs", "hp.lr", "selected.C",
                                  "selected.epoch", "id_val.accuracy"]
    assert list(rows[0])[-4:] == ["ood_mean.accuracy", "weight_change", "fit_seconds", "cpu_seconds"]
    assert "ood/b.ece" in rows[0]
    assert [r["method"] for r in rows] == ["lp"] * 3 + ["ft"] * 6 + ["lpft"] * 3  # registration order
    lp, ft = rows[0], rows[3]
    assert (lp["hp.C"], lp["selected.C"], lp["hp.lr"], lp["selected.epoch"]) == ("auto", "1.0", "", "")
    assert (ft["hp.lr"], ft["seed"], ft["selected.epoch"], ft["id_test.accuracy"]) == ("0.001", "0", "2", "0.89")
    assert float(ft["ood_mean.accuracy"]) == pytest.approx(0.46) and ft["fit_seconds"] == "1.5"
    assert (ft["cpu_seconds"], ft["weight_change"], lp["weight_change"]) == ("2.5", "0.01", "0.0")


def test_tables_give_each_methods_weight_change_and_cost():
    seconds = {"lp": (1.0, 0.5), "ft": (10.0, 20.0), "lpft": (12.0, 24.0)}
    trials = [dataclasses.replace(
        t, timings={"fit_seconds": seconds[t.method][0] * (1 + t.seed), "cpu_seconds": seconds[t.method][1]},
        diagnostics={"weight_change": 0.0 if t.method == "lp" else 0.001 * (1 + t.seed)}) for t in TRIALS]
    (table,) = build_tables(trials, [IDValidation()])
    cells = {row.method: dict(zip(table.headers, table.texts(row))) for row in table.rows}
    assert cells["lp"]["Δw"] == "0%" and cells["ft"]["Δw"] == "0.2%"  # seeds 0-2: 0.1, 0.2, 0.3%
    # every trial of the method counts, the unchosen learning rate's too: 6 FT trials, 20 s mean wall
    assert cells["ft"]["s/trial (CPU) × trials"] == "20 (20) × 6"
    assert cells["lpft"]["s/trial (CPU) × trials"] == "24 (24) × 3"
    old = dataclasses.replace(trials[0], timings={"fit_seconds": 1.0}, diagnostics={})  # stored before both existed
    (table,) = build_tables([old, *trials[1:]], [IDValidation()])
    lp = dict(zip(table.headers, table.texts(table.rows[0])))
    assert lp["s/trial (CPU) × trials"].endswith("(?) × 3") and lp["Δw"] == "–"


HOSTILE = "ev|il *x* `y` <script>alert(1)</script>\n# [a](b) _u_ $m$ &lt;"


def hostile_trials() -> list[RunRecord]:
    """TRIALS with a task, an OOD split and a hyperparameter value that are Markdown and HTML."""
    rename = lambda d: {("ood/" + HOSTILE if k == "ood/a" else k): v for k, v in d.items()}  # noqa: E731
    return [dataclasses.replace(
        t, task=HOSTILE, metrics=rename(t.metrics), hyperparameters={**t.hyperparameters, "opt": f"{t.seed % 2}|<b>"},
        history=[{**h, "accuracy": rename(h["accuracy"])} if "accuracy" in h else h for h in t.history],
    ) for t in TRIALS]


def test_markdown_escapes_hostile_names():
    from markdown_it import MarkdownIt

    table = build_tables(hostile_trials(), [IDValidation()])
    text = f"# {md_escape(HOSTILE)}\n\n" + to_markdown(table)
    tokens = MarkdownIt("commonmark").enable("table").parse(text)  # raw HTML on, as GitHub's renderer
    assert not [t for t in tokens if t.type.startswith("html")]
    inline = [t for t in tokens if t.type == "inline"]
    plain = " ".join(HOSTILE.split())
    assert inline[0].children and "".join(c.content for c in inline[0].children if c.type == "text") == plain
    assert all(c.type == "text" for t in inline for c in t.children)  # no code, emphasis, links, HTML, breaks
    cells, count = [], 0  # cells per table row
    for t in tokens:
        if t.type in ("td_open", "th_open"):
            count += 1
        elif t.type == "tr_close":
            cells, count = [*cells, count], 0
    assert cells == [12] * 4  # header, LP, FT, LP-FT: no row cut short or cell split by a '|' or a newline
    assert any(plain in "".join(c.content for c in t.children) for t in inline if t.children)  # the OOD header
    assert "opt=1\\|&lt;b&gt;" in text or "opt=0\\|&lt;b&gt;" in text


def test_html_escapes_hostile_names(tmp_path):
    from html.parser import HTMLParser

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []
            self.text: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.tags.append(tag)

        def handle_data(self, data: str) -> None:
            self.text.append(data)

    report = write_report(hostile_trials(), tmp_path, [IDValidation()], title=HOSTILE, sweeps=[HOSTILE],
                          command=["lpft", HOSTILE], db=HOSTILE)
    parser = Tags()
    parser.feed(report.html.read_text())
    assert "script" not in parser.tags and "b" not in parser.tags and parser.tags.count("img") == 2  # the plots
    assert "".join(parser.text).count(HOSTILE) >= 5  # title, heading, sweep, command, database: as text


def test_html_page_says_where_its_numbers_come_from(tmp_path):
    from lpft.results.spec import parse_spec

    spec = parse_spec({"name": "toy-sweep", "task": "toy", "backbone": "bb", "methods": {"ft": {"lr": [1e-3, 1e-2]}}})
    env = {"lpft": "0.1.0", "torch": "2.4.0", "python": "3.11.7", "device": "cpu",
           "started_at": "2026-12-03T09:01:37+00:00"}
    trials = [dataclasses.replace(t, environment=env | ({"torch": "2.5.0"} if t.method == "lp" else {}))
              for t in TRIALS]
    page = write_report(trials, tmp_path, [IDValidation()], sweeps=[spec], command=["lpft", "sweep", "toy.yaml"],
                        db=tmp_path / "r.sqlite").html.read_text()
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in page
    assert "<dt>command</dt><dd>lpft sweep toy.yaml</dd>" in page and f"<dd>{tmp_path / 'r.sqlite'}</dd>" in page
    assert "<dt>torch</dt><dd>2.4.0 (9 trials), 2.5.0 (3 trials)</dd>" in page and "<dd>3.11.7</dd>" in page
    assert "12 finished, started 2026-12-03 09:01 UTC" in page
    assert "<summary>sweep spec toy-sweep</summary>" in page and "- 0.001\n" in page  # the spec's grid, as YAML
    assert page.count("<div class='scroll'>") == 1


def test_every_method_and_soup_has_a_colour_and_marker_of_its_own():
    from lpft.methods import method_names
    from lpft.methods.base import POST_HOC_LABELS
    from lpft.results.plots import _color, _marker

    names = [*method_names(registered_order=True), *POST_HOC_LABELS]
    assert len({_color(n) for n in names}) == len(names) and len({_marker(n) for n in names}) == len(names)


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_terminal_table_leaves_columns_out_to_fit_instead_of_folding_every_cell(width):
    from rich.console import Console

    from lpft.commands.report import rich_table

    (headline,) = build_tables(TRIALS, [IDValidation()])
    console = Console(record=True, width=width)
    console.print(rich_table(headline, width))
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    terminal = "\n".join(lines)
    ft = headline.rows[1]
    row = next(line for line in lines if line.startswith("│ FT "))  # one line per method: no folded cells
    assert ft.cells["id_test"].text() in row and ft.cells["ood_mean"].text() in row
    assert "FT: lr=0.001; chosen epoch per seed: 2, 2, 2" in terminal  # the selection, under the table
    assert "Left out to fit the terminal" in terminal
    full = Console(record=True, width=400)
    full.print(rich_table(headline))  # no width: every column, the selected settings in theirs
    text = full.export_text()
    assert "ECE OOD" in text and "OOD a" in text and "Left out" not in text and "│ lr=0.001; chosen epoch" in text
