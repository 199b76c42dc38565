"""``lpft reproduce --methods``: which methods run, soups cooked from kept LP-FT runs, the report's columns.

The bundled benchmarks take minutes per trial, so the packaged spec is swapped for a tiny one
of the same shape (a PNG task, EfficientNet-Lite0 at 32 px): the command's own logic is tested.
"""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from lpft.cli import main as cli_main
from lpft.commands import reproduce
from lpft.results.spec import load_spec
from lpft.results.store import Store
from lpft.runs.artifacts import WEIGHTS_FILE

from conftest import write_png_task

SWEEP = "tiny"


@pytest.fixture
def tiny_benchmark(tmp_path, monkeypatch, cache):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": SWEEP, "task": str(write_png_task(tmp_path / "task")), "backbone": "efficientnet-lite0",
        "backbone_options": {"image_size": 32}, "seeds": [0], "device": "cpu",
        "finetune": {"epochs": 1, "batch_size": 16},
        "methods": {"lp": {"C": "auto"}, "ft": {"lr": 0.03}, "lpft": {"lr": [1.0e-3, 3.0e-3]},
                    "l2-sp": {"lr": 0.03, "l2sp_lambda": [0.1, 1.0]}},
    }))
    monkeypatch.setattr(reproduce, "packaged_spec", lambda benchmark, full: load_spec(spec))
    return tmp_path / "out"


def _reproduce(out, *methods) -> int:
    return cli_main(["--no-progress", "reproduce", "--benchmarks", "digits", "--out", str(out), "--rules", "id-val",
                     *(["--methods", *methods] if methods else [])])


def _finished(out) -> Counter[str]:
    with Store(out / "results.sqlite", readonly=True) as store:
        return Counter(t.method for t in store.trials("finished", SWEEP))


def test_only_the_chosen_methods_run_and_soups_are_cooked_from_kept_lpft_runs(tiny_benchmark):
    out = tiny_benchmark
    assert _reproduce(out, "l2-sp", "greedy-soup", "uniform-soup") == 0
    # LP-FT runs as the soups' ingredients; LP and FT were not asked for
    assert _finished(out) == {"lpft": 2, "l2-sp": 2, "greedy-soup": 1, "uniform-soup": 1}
    with Store(out / "results.sqlite", readonly=True) as store:
        trials = store.trials("finished", SWEEP)
    kept = {p.name for p in (out / "kept").iterdir() if (p / WEIGHTS_FILE).is_file()}
    assert kept == {t.config_hash for t in trials if t.method == "lpft"}  # only the ingredients keep weights
    for t in trials:
        assert t.timings["cpu_seconds"] > 0  # every trial's cost, the soups' cooking too
        if t.method in ("lpft", "l2-sp"):
            # how far the kept model's backbone moved: nowhere when the run kept its start (epoch 0)
            assert (t.diagnostics["weight_change"] > 0) == (t.selected["epoch"] > 0)
    by_hash = {t.config_hash: t for t in trials}
    for soup in (t for t in trials if t.method == "uniform-soup"):
        moved = [by_hash[i["trial"]].diagnostics["weight_change"] for i in soup.diagnostics["soup"]["ingredients"]]
        # ||mean(w_i) - w0|| <= mean ||w_i - w0||: measured from the weights the ingredients started from
        assert soup.diagnostics["weight_change"] <= sum(moved) / len(moved) + 1e-6
        assert (soup.diagnostics["weight_change"] > 0) == any(m > 0 for m in moved)
    report = (out / "results.md").read_text()
    assert "| Greedy soup |" in report and "| L2-SP |" in report and "| FT |" not in report
    assert "| Δw | s/trial (CPU) × trials |" in report


def test_soups_refuse_lpft_runs_finished_without_their_weights(tiny_benchmark, capsys):
    out = tiny_benchmark
    assert _reproduce(out, "lpft") == 0  # weights not kept: no soup was asked for
    assert _reproduce(out, "greedy-soup") == 2
    assert "2 of 2 finished 'lpft' trials of sweep" in capsys.readouterr().err


def test_an_unknown_method_is_refused_naming_the_known_ones(tiny_benchmark, capsys):
    assert _reproduce(tiny_benchmark, "lora") == 2  # not in this benchmark's spec
    err = capsys.readouterr().err
    assert "lora" in err and "l2-sp" in err and "greedy-soup" in err
    assert not (tiny_benchmark / "results.sqlite").exists()
