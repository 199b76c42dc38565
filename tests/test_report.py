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
from lpft.results.tables import build_tables, t_interval, to_markdown
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
    assert "lr=0.001" in ft.chosen and "epoch 2/2/2" in ft.chosen
    assert headline.rows[0].chosen == "C (auto) 1/1/1"
    # the oracle prefers the lr with the better OOD accuracy, at epoch 1
    assert "lr=0.01" in oracle.rows[1].chosen and "epoch 1/1/1" in oracle.rows[1].chosen
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
