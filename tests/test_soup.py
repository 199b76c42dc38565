"""Model soups over a sweep's kept runs: the recipes, what is stored, and the report beside the ingredients."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest
import torch
import yaml

from lpft.errors import RunError
from lpft.results.report import load_results
from lpft.results.soup import _mean_state, cook, cook_sweep, ingredients
from lpft.results.spec import load_spec
from lpft.results.store import Store
from lpft.results.sweep import run_sweep
from lpft.results.tables import build_tables, to_markdown
from lpft.results.selection import IDValidation

from conftest import write_png_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def souped(tmp_path_factory):
    """A 2-seed x 3-lr FT sweep of tiny runs (each seed: one seeded random head), kept, then souped."""
    root = tmp_path_factory.mktemp("soup")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LPFT_CACHE", str(root / "cache"))
        yield _sweep_and_soup(root)


def _sweep_and_soup(root):
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "soup-test", "task": str(write_png_task(root / "task")), "backbone": "timm:test_resnet",
        "backbone_options": {"weights": "random", "image_size": 32}, "seeds": [0, 1], "device": "cpu",
        "methods": {"ft": {"lr": [0.01, 0.03, 0.1], "epochs": 2, "batch_size": 16}},
    }))
    db, runs = root / "results.sqlite", root / "runs"
    summary = run_sweep(load_spec(spec_path), db, progress=False, keep_runs=runs)
    assert summary.finished == 6
    rows = cook_sweep(db, "soup-test", runs, "ft", CPU)
    return db, runs, rows, spec_path


def test_a_soup_is_the_mean_of_float_tensors():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    mean = _mean_state([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 5


def test_each_seed_gets_a_uniform_and_a_greedy_soup_chosen_on_id_validation(souped):
    db, runs, rows, _ = souped
    assert sorted((r["seed"], r["soup"]) for r in rows) == [(s, f"{k}-soup") for s in (0, 1) for k in ("greedy", "uniform")]
    with Store(db, readonly=True) as store:
        trials = {t.config_hash: t for t in store.trials("finished", "soup-test")}
        groups = ingredients(store, "soup-test", runs, "ft")
    for seed in (0, 1):
        group = next(g for key, g in groups.items() if key[2] == seed)
        best = max(i.id_val for i in group)
        stored = {t.method: t for t in trials.values() if t.method.endswith("-soup") and t.seed == seed}
        uniform, greedy = stored["uniform-soup"], stored["greedy-soup"]
        assert len(uniform.diagnostics["soup"]["ingredients"]) == 3
        members = greedy.diagnostics["soup"]["ingredients"]
        assert members[0]["id_val"] == best  # greedy starts from the best single model ...
        assert greedy.metrics["id_val"]["accuracy"] >= best  # ... and never lets ID validation drop
        assert all(trials[m["trial"]].seed == seed for m in members)  # ingredients share the seed's start


def test_the_soups_of_one_ingredient_are_that_model(souped):
    db, runs, _, _ = souped
    with Store(db, readonly=True) as store:
        group = next(iter(ingredients(store, "soup-test", runs, "ft").values()))
    single = group[0]
    for soup in cook([single], CPU):  # built here, so the case always occurs
        assert [m.trial.config_hash for m in soup.ingredients] == [single.trial.config_hash]
        for key, metrics in single.trial.metrics.items():
            assert soup.metrics[key]["accuracy"] == pytest.approx(metrics["accuracy"])
        assert soup.weight_change is None  # a random init cannot be rebuilt: no Δw rather than a wrong one


def test_cooking_again_keeps_the_stored_soups(souped):
    db, runs, rows, _ = souped
    again = cook_sweep(db, "soup-test", runs, "ft", CPU)
    assert {r["state"] for r in again} == {"kept"}
    assert sorted(json.dumps(r["accuracy"], sort_keys=True) for r in again) == \
        sorted(json.dumps(r["accuracy"], sort_keys=True) for r in rows)


def test_the_report_shows_soups_beside_their_ingredients(souped):
    db, *_ = souped
    records = load_results(db, "soup-test")
    text = to_markdown(build_tables(records, [IDValidation()]))
    assert "Greedy soup" in text and "Uniform soup" in text and "| FT" in text


def test_lpft_soup_cli(souped, tmp_path):
    db, runs, _, _ = souped
    done = subprocess.run([sys.executable, "-m", "lpft.cli", "--no-progress", "soup", str(db), "--runs", str(runs),
                           "--method", "ft", "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Greedy soup" in done.stdout and "Uniform soup" in done.stdout and "kept" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "lpft.cli", "soup", str(db), "--runs", str(tmp_path),
                              "--method", "ft", "--device", "cpu"], capture_output=True, text=True)
    assert missing.returncode == 2 and "--keep-runs" in missing.stderr


def test_kept_runs_hold_the_tuned_weights(souped):
    _, runs, _, _ = souped
    kept = sorted(runs.iterdir())
    assert len(kept) == 6 and all((k / "model.safetensors").is_file() for k in kept)
    assert all(json.loads((k / "run.json").read_text())["record"]["method"] == "ft" for k in kept)


def test_a_soup_of_fewer_models_than_the_sweep_ran_is_refused(souped, tmp_path):
    db, runs, _, _ = souped
    partial = tmp_path / "runs"
    shutil.copytree(runs, partial)
    next(partial.iterdir()).joinpath("model.safetensors").unlink()  # one of the six runs lost its weights
    with Store(db) as store, pytest.raises(RunError, match="1 of 6 finished 'ft' trials"):
        ingredients(store, "soup-test", partial, "ft")


def test_soups_are_cooked_again_in_place_when_the_grid_grew(souped, tmp_path):
    db, runs, _, spec_path = souped
    grown_db, grown_runs = tmp_path / "results.sqlite", tmp_path / "runs"
    with closing(sqlite3.connect(db)) as conn:  # a consistent copy of the WAL database
        conn.execute("VACUUM INTO ?", (str(grown_db),))
    shutil.copytree(runs, grown_runs)
    spec = yaml.safe_load(spec_path.read_text())
    spec["methods"]["ft"]["lr"].append(0.003)  # one more learning rate, both seeds
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert run_sweep(load_spec(tmp_path / "spec.yaml"), grown_db, progress=False, keep_runs=grown_runs).finished == 2
    rows = cook_sweep(grown_db, "soup-test", grown_runs, "ft", CPU)
    assert {r["state"] for r in rows} == {"cooked"} and {r["tried"] for r in rows} == {4}
    with Store(grown_db) as store:
        soups = [t for t in store.trials("finished", "soup-test") if t.method.endswith("-soup")]
    assert len(soups) == 4  # replaced, not added beside the stale ones
    assert all(len(t.diagnostics["soup"]["ingredients"]) == 4 for t in soups if t.method == "uniform-soup")
