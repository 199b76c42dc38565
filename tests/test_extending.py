"""A new method is one file: the toy method in tests/toy_method.py registers, runs, sweeps and reports
with no other module changed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import toy_method  # noqa: F401  (registers "shrunk-lp", as a plugin's entry point would)
from lpft.cli import build_parser
from lpft.cli import main as cli_main
from lpft.errors import ConfigError, SpecError
from lpft.methods import create_method, method_names
from lpft.results.report import load_results, write_report
from lpft.results.selection import IDValidation
from lpft.results.spec import parse_spec
from lpft.results.sweep import expand, run_sweep
from lpft.runs import run

from conftest import TEXT_TOPICS


def test_the_toy_method_registers_with_its_own_setting_as_a_flag():
    assert "shrunk-lp" in method_names()
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "--shrink" in help_text and "shrunk-lp" in help_text
    with pytest.raises(ConfigError, match="shrink .* must be > 0"):
        create_method("shrunk-lp", {"shrink": 0.0})


def test_the_toy_method_runs_sweeps_and_reports(cache, tmp_path):
    full = run(str(TEXT_TOPICS), "minilm-l6", "shrunk-lp", {"shrink": 1.0}, "cpu")
    half = run(str(TEXT_TOPICS), "minilm-l6", "shrunk-lp", {"shrink": 0.5}, "cpu")
    assert full.hyperparameters == {"seed": 0, "C": 1.0, "shrink": 1.0}
    # shrinking the weights changes the logits (hence the NLL) but keeps their scale's argmax here
    assert half.metrics["id_test"]["nll"] != full.metrics["id_test"]["nll"]

    spec = parse_spec({"name": "toy", "task": str(TEXT_TOPICS), "backbone": "minilm-l6", "seeds": [0, 1],
                       "methods": {"shrunk-lp": {}}})
    assert spec.methods["shrunk-lp"] == {"shrink": [0.5, 1.0]}  # the method's own default grid
    assert len(expand(spec)) == 4
    summary = run_sweep(spec, tmp_path / "r.sqlite", "cpu", progress=False)
    assert (summary.finished, summary.failed) == (4, 0)
    records = load_results(tmp_path / "r.sqlite")
    report = write_report(records, tmp_path / "report", [IDValidation()])
    (table,) = report.tables
    (row,) = table.rows
    assert row.label == "Shrunk LP" and len(row.seeds) == 2
    assert "shrink=" in row.chosen
    assert "Shrunk LP" in report.markdown.read_text()
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['lr'\] in 'methods.shrunk-lp'"):
        parse_spec({"task": "t", "backbone": "b", "methods": {"shrunk-lp": {"lr": [1e-3]}}})


def test_the_toy_methods_flag_reaches_it_and_foreign_flags_are_refused(cache, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli_main(["run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "shrunk-lp", "--shrink", "0.25",
                     "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["hyperparameters"]["shrink"] == 0.25 and np.isfinite(record["metrics"]["id_test"]["nll"])
    assert cli_main(["run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "shrunk-lp", "--lr", "0.1"]) == 2
    assert "--lr does not apply to --method shrunk-lp" in capsys.readouterr().err
