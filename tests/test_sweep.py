"""Sweep specs, the results database, and a sweep that survives SIGKILL and resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lpft.errors import SpecError
from lpft.results.report import load_results
from lpft.results.selection import IDValidation, LastEpoch, OODOracle
from lpft.results.spec import parse_spec
from lpft.results.store import Store
from lpft.results.sweep import Trial, config_hash, expand, run_trial
from lpft.results.tables import build_tables, to_markdown
from lpft.training import auto_batch_size

from conftest import write_png_task

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- spec
def test_spec_defaults_are_the_papers_protocol():
    spec = parse_spec({"task": "emoji-styles", "backbone": "efficientnet-lite0"})
    assert spec.seeds == (0, 1, 2)
    assert set(spec.methods) == {"lp", "ft", "lpft"}
    assert spec.methods["lp"] == {"C": "auto"}
    ft, lpft = spec.methods["ft"], spec.methods["lpft"]
    assert ft["lr"] == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2] and len(lpft["lr"]) == 6
    assert max(lpft["lr"]) < max(ft["lr"])  # LP-FT takes smaller learning rates
    assert ft["optimizer"] == "sgd" and ft["momentum"] == 0.9 and ft["weight_decay"] == 0.0
    assert ft["epochs"] == 20 and ft["bn_mode"] == lpft["bn_mode"] == "frozen"
    assert auto_batch_size(50_000) == 64 and auto_batch_size(300) == 30 and auto_batch_size(20) == 8


@pytest.mark.parametrize("raw, message", [
    ({"backbone": "x"}, "needs 'task'"),
    ({"task": "t"}, "needs 'backbone'"),
    ({"task": "t", "backbone": "b", "learning_rate": 1}, r"unknown key\(s\) \['learning_rate'\]"),
    ({"task": "t", "backbone": "b", "methods": {"sgd": {}}}, "unknown method 'sgd'"),
    ({"task": "t", "backbone": "b", "methods": {"ft": {"lrr": [1e-3]}}}, r"unknown key\(s\) \['lrr'\] in 'methods.ft'"),
    ({"task": "t", "backbone": "b", "methods": {"ft": {"lr": [-1.0]}}}, r"'methods.ft.lr': lr \(FinetuneConfig\) must be > 0"),
    ({"task": "t", "backbone": "b", "methods": {"ft": {"seed": 1}}}, "top-level 'seeds'"),
    ({"task": "t", "backbone": "b", "methods": {"lp": {"lr": [1e-3]}}}, r"unknown key\(s\) \['lr'\] in 'methods.lp'; lp has \['C'\]"),
    ({"task": "t", "backbone": "b", "methods": {"lp": {"C": [0.0]}}}, r"'methods.lp.C': C \(LinearProbeConfig\) must be > 0"),
    ({"task": "t", "backbone": "b", "seeds": "zero"}, "non-empty list of integers"),
    ({"task": "t", "backbone": "b", "seeds": [1, 1]}, "duplicates"),
    ({"task": "t", "backbone": "b", "seeds": [2**70]}, r"'seeds': seed \(MethodConfig\) must be <= 4294967295"),
    ({"task": "t", "backbone": "b", "finetune": {"bn_mode": "fast"}}, r"bn_mode \(FinetuneConfig\) must be one of \['frozen', 'train'\]"),
    ({"task": "t", "backbone": "b", "backbones": ["c"]}, "not both"),
    ({"task": "t", "backbone": "b", "methods": {"ft": {"lr": [float("nan")]}}}, "must be a finite number"),
    ({"task": "t", "backbone": "b", "methods": {"ft": {"lr": ".inf"}}}, "must be a number"),
    ({"task": "t", "backbone": "b", "methods": ["lp"], "finetune": {"lr": 1e-3}}, "no method of this spec"),
])
def test_spec_errors_name_the_key(raw, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


@pytest.mark.parametrize("line, message", [
    ("note: !!python/object/apply:os.system ['touch {marker}']\n",
     r"spec.yaml, line 3, column 7: not valid YAML: could not determine a constructor for the tag .*python/object"),
    ("task: other\n", r"spec.yaml, line 3, column 1: not valid YAML: key 'task' is given twice"),
])
def test_spec_yaml_is_read_safely_and_strictly_in_one_line(tmp_path, line, message):
    from lpft.results.spec import load_spec

    marker = tmp_path / "ran"
    spec = tmp_path / "spec.yaml"
    spec.write_text("task: t\nbackbone: b\n" + line.format(marker=marker))
    with pytest.raises(SpecError, match=message) as err:
        load_spec(spec)
    assert "\n" not in str(err.value) and not marker.exists()


def test_yaml_exponents_without_dot_are_numbers_and_grids_expand():
    raw = yaml.safe_load("""
task: t
backbones: [{name: b, image_size: 32}, c]
seeds: [0, 1]
finetune: {epochs: 2, batch_size: 16}
methods:
  lp: {}
  ft: {lr: [1e-3, 3e-3], epochs: [1, 2]}
""")
    spec = parse_spec(raw)
    assert spec.methods["ft"]["lr"] == [1e-3, 3e-3]
    trials = expand(spec)
    # per backbone: LP 2 seeds (not multiplied by the lr x epochs grid), FT 2 lr x 2 epochs x 2 seeds
    assert len(trials) == 2 * (2 + 8)
    assert len({t.hash for t in trials}) == len(trials)
    lp = [t for t in trials if t.config["method"] == "lp"]
    assert lp[0].config["hyperparameters"] == {"C": "auto", "seed": 0}
    ft = next(t for t in trials if t.config["method"] == "ft")
    assert ft.config["hyperparameters"]["batch_size"] == 16 and ft.config["backbone_options"] == {"image_size": 32}
    assert "momentum" in ft.config["hyperparameters"]  # resolved: every FinetuneConfig field written out


def test_config_hash_is_canonical():
    a = {"task": "t", "hyperparameters": {"lr": 0.001, "seed": 0}}
    b = {"hyperparameters": {"seed": 0, "lr": 0.001}, "task": "t"}
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 64
    assert config_hash(a) != config_hash({**a, "task": "u"})


# ---------------------------------------------------------------------- store
CONFIG = {"task": "t", "backbone": "b", "backbone_options": {}, "method": "lp", "task_options": {},
          "hyperparameters": {"C": "auto", "seed": 0}}


def test_store_lifecycle_and_failed_trials(tmp_path):
    db = tmp_path / "r.sqlite"
    trial = Trial(CONFIG)
    with Store(db) as store:
        store.register("s", trial.hash, trial.config)
        store.register("s", trial.hash, trial.config)  # idempotent
        assert store.counts()["pending"] == 1
    # an unknown task fails inside run_trial: recorded with its traceback, not raised
    assert run_trial(trial, db, "cpu") == "failed"
    with Store(db) as store:
        (row,) = store.trials(status=None)
        assert row.status == "failed" and row.attempts == 1 and "unknown task 't'" in row.error
        assert store.claim(trial.hash)
        store.mark_finished(trial.hash, task_name="t", selected={"C": 1.0}, metrics={"id_val": {"accuracy": 0.5}}, history=[],
                            timings={"fit_seconds": 1.0}, environment={"torch": "x"})
        store.register("s", trial.hash, trial.config)  # re-registering keeps a finished trial finished
        (row,) = store.trials()
        assert row.status == "finished" and row.attempts == 2 and row.error is None
        assert row.metrics == {"id_val": {"accuracy": 0.5}} and row.config == CONFIG
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------- kill -9 and resume
def _sweep(spec: Path, db: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lpft.cli", "sweep", str(spec), "--db", str(db), "--device", "cpu",
                             "--no-report"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finished(db: Path) -> dict[str, tuple[int, float]]:
    if not db.exists():
        return {}
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            rows = conn.execute("SELECT config_hash, attempts, finished_at FROM trials WHERE status='finished'")
            return {h: (a, f) for h, a, f in rows}
        except sqlite3.OperationalError:  # the schema is not created yet
            return {}


def test_sweep_survives_sigkill_and_resumes_to_the_same_table(tmp_path):
    task_yaml = write_png_task(tmp_path / "task")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "kill-test", "task": str(task_yaml),
        "backbone": "efficientnet-lite0", "backbone_options": {"image_size": 32},
        "seeds": [0, 1], "finetune": {"epochs": 2, "batch_size": 16},
        "methods": {"lp": {"C": [0.1]}, "ft": {"lr": [1e-3]}},  # LP first: seconds; then FT: ~10 s a trial
    }, sort_keys=False))
    env = {**os.environ, "LPFT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    killed_db, clean_db = tmp_path / "killed.sqlite", tmp_path / "clean.sqlite"

    # the uninterrupted reference runs alongside (own feature cache), to save wall time
    clean = _sweep(spec, clean_db, {**env, "LPFT_CACHE": str(tmp_path / "clean-cache")})
    proc = _sweep(spec, killed_db, env)
    deadline = time.monotonic() + 150
    while not _finished(killed_db) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(killed_db)
    assert 1 <= len(before) < 4, before

    resumed = _sweep(spec, killed_db, env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    after = _finished(killed_db)
    assert len(after) == 4  # 2 seeds x (LP, FT)
    for h, (attempts, finished_at) in before.items():
        assert after[h] == (attempts, finished_at) == (1, finished_at), "a finished trial ran again"
    with Store(killed_db) as store:
        assert store.counts()["finished"] == 4 and store.counts()["running"] == 0

    assert clean.wait(timeout=300) == 0, clean.stderr.read()[-2000:]
    # fine-tuning on CPU is deterministic given the seed: every trial's metrics match exactly
    with Store(killed_db) as a, Store(clean_db) as b:
        assert {t.config_hash: t.metrics for t in a.trials()} == {t.config_hash: t.metrics for t in b.trials()}
    rules = [IDValidation(), LastEpoch(), OODOracle()]
    killed, clean_tables = (build_tables(load_results(db), rules) for db in (killed_db, clean_db))
    for table in (*killed, *clean_tables):
        for row in table.rows:
            row.cost = "timed"  # the one column that differs: each run's own seconds
    table = to_markdown(killed)
    assert table == to_markdown(clean_tables)
    assert "LP-FT" not in table and "| FT |" in table and "| LP |" in table
