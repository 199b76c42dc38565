"""Experiment trackers: runs and sweeps logged to MLflow and TensorBoard, read back with those tools' own readers;
a tracker that fails never fails the run; a bad ``--track`` is a one-line error before any work."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lpft.errors import ConfigError
from lpft.results.spec import parse_spec
from lpft.results.store import Store
from lpft.results.sweep import run_sweep
from lpft.runs import RunRecord, RunSpec, execute
from lpft.runs.tracking import MlflowTracker, TensorBoardTracker, Tracker, create_tracker, log_safely

from conftest import small_digits_task, write_png_task

ROOT = Path(__file__).resolve().parents[1]
TINY = {"weights": "random", "image_size": 32}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    """MLflow would try to send usage telemetry; the file-store opt-in set by a tracker is undone after each test."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> RunRecord:
    """A 2-epoch FT run on tiny digits: history at epochs 0, 1, 2, and an OOD split."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LPFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        spec = RunSpec("tiny-digits", "timm:test_resnet", "ft", {"epochs": 2, "lr": 0.05, "batch_size": 16},
                       backbone_options=TINY)
        return execute(spec, "cpu", task=small_digits_task(per_split=20))


def _one_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} at {uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_mlflow_holds_tags_params_epoch_history_final_metrics_and_the_record(record, tmp_path):
    tracker = create_tracker(f"mlflow:{tmp_path / 'mlruns'}")
    assert isinstance(tracker, MlflowTracker) and tracker.uri == (tmp_path.resolve() / "mlruns").as_uri()
    assert log_safely(tracker, record, "tiny-digits")

    client, run = _one_run(tracker.uri, "tiny-digits")
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("ft-")
    tags = run.data.tags
    assert [tags[k] for k in ("task", "backbone", "method", "seed")] == ["tiny-digits", "timm:test_resnet", "ft", "0"]
    params = run.data.params
    assert (params["lr"], params["epochs"], params["optimizer"]) == ("0.05", "2", "sgd")
    assert (params["backbone.weights"], params["backbone.image_size"]) == ("random", "32")

    for split in ("id_val", "id_test", "ood/inverted"):
        history = client.get_metric_history(run.info.run_id, f"accuracy/{split}")
        assert [(m.step, m.value) for m in history] == [(h["epoch"], h["accuracy"][split]) for h in record.history]
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == [1, 2]  # epoch 0 (the start) has no training loss
    metrics = run.data.metrics
    for split, values in record.metrics.items():
        for name in ("accuracy", "ece", "nll"):
            assert metrics[f"final/{split}/{name}"] == pytest.approx(values[name])
    assert metrics["selected/epoch"] == record.selected["epoch"] and metrics["timings/fit_seconds"] > 0

    saved = Path(client.download_artifacts(run.info.run_id, "record.json", str(tmp_path)))
    assert RunRecord.from_json(json.loads(saved.read_text())).metrics == record.metrics


def test_split_names_mlflow_refuses_are_made_safe(record, tmp_path):
    odd = RunRecord.from_json({**record.to_json(), "metrics": {"ood/scans (2024)": record.metrics["id_test"]},
                               "history": [{"epoch": 1, "accuracy": {"ood/scans (2024)": 0.5}}]})
    tracker = create_tracker(f"mlflow:{tmp_path}")
    assert log_safely(tracker, odd, "odd")
    _, run = _one_run(tracker.uri, "odd")
    assert {"accuracy/ood/scans _2024_", "final/ood/scans _2024_/accuracy"} <= set(run.data.metrics)


def test_track_values_are_parsed_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tmp_path = tmp_path.resolve()
    assert create_tracker("mlflow").uri == (tmp_path / "mlruns").as_uri()  # a local file store by default
    assert create_tracker("mlflow:http://127.0.0.1:5000").uri == "http://127.0.0.1:5000"  # any tracking URI as given
    assert create_tracker("tensorboard").folder == tmp_path / "tensorboard-runs"
    assert create_tracker("tensorboard:tb").folder == tmp_path / "tb"
    with pytest.raises(ConfigError, match=r"unknown tracker 'wandb'; use mlflow\[:URI\] or tensorboard\[:DIR\]"):
        create_tracker("wandb:project")
    with pytest.raises(ConfigError, match="nothing after ':'"):
        create_tracker("mlflow:")


def test_a_database_store_without_sqlalchemy_asks_for_full_mlflow(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # mlflow-skinny has no SQLAlchemy
    with pytest.raises(ConfigError, match="database stores need the full MLflow package.*pip install mlflow$"):
        create_tracker("mlflow:sqlite:///runs.db")


@pytest.mark.parametrize("text, module, extra", [("mlflow", "mlflow", "mlflow"),
                                                 ("tensorboard:tb", "torch.utils.tensorboard", "tensorboard")])
def test_a_missing_library_names_the_extra(text, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match=rf"pip install 'lpft\[{extra}\]'"):
        create_tracker(text)


def test_tensorboard_event_files_hold_epoch_scalars_final_metrics_and_hparams(record, tmp_path):
    tracker = create_tracker(f"tensorboard:{tmp_path}")
    assert isinstance(tracker, TensorBoardTracker)
    assert log_safely(tracker, record, "tiny-digits") and log_safely(tracker, record, "tiny-digits", "ab" * 32)
    by_trial, by_time = sorted((tmp_path / "tiny-digits").iterdir(), key=lambda f: f.name.startswith("ft-20"))
    assert by_trial.name == "ft-" + "ab" * 6 and by_time.name.startswith("ft-20")  # <method>-<trial hash or time>

    events = EventAccumulator(str(by_time))
    events.Reload()
    for split in ("id_val", "ood/inverted"):
        scalars = events.Scalars(f"accuracy/{split}")
        assert [s.step for s in scalars] == [0, 1, 2]
        assert [s.value for s in scalars] == pytest.approx([h["accuracy"][split] for h in record.history])
    assert [s.step for s in events.Scalars("train_loss")] == [1, 2]
    (final,) = events.Scalars("final/id_test/accuracy")
    assert final.step == record.selected["epoch"]
    assert final.value == pytest.approx(record.metrics["id_test"]["accuracy"])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert json.loads((by_time / "record.json").read_text())["method"] == "ft"

    # the same run logged again in the same second gets a folder of its own
    assert log_safely(tracker, record, "tiny-digits")
    assert len(list((tmp_path / "tiny-digits").iterdir())) == 3


class Broken(Tracker):
    name = "broken"
    target = "nowhere"

    def log_record(self, record, experiment, trial_hash=None):
        raise RuntimeError("server down")


@pytest.fixture
def sweep_spec(tmp_path):
    """Three trials: LP at two C values and a 1-epoch FT, on a tiny PNG task."""
    task = write_png_task(tmp_path / "task")
    return parse_spec({"name": "tracked", "task": str(task), "backbone": "timm:test_resnet", "backbone_options": TINY,
                       "seeds": [0], "device": "cpu", "finetune": {"epochs": 1, "batch_size": 16},
                       "methods": {"lp": {"C": [0.1, 1.0]}, "ft": {"lr": [1e-3]}}})


def test_a_sweep_logs_one_mlflow_run_per_trial_in_the_sweeps_experiment(sweep_spec, tmp_path, cache):
    tracker = create_tracker(f"mlflow:{tmp_path / 'mlruns'}")
    db = tmp_path / "results.sqlite"
    assert run_sweep(sweep_spec, db, progress=False, tracker=tracker).finished == 3
    assert run_sweep(sweep_spec, db, progress=False, tracker=tracker).skipped == 3  # resumed: nothing logged twice

    client = MlflowClient(tracking_uri=tracker.uri)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    with Store(db) as store:
        stored = {t.config_hash: t for t in store.trials()}
    assert sorted(r.data.tags["trial_hash"] for r in runs) == sorted(stored)
    for run in runs:
        trial = stored[run.data.tags["trial_hash"]]
        assert run.info.run_name == f"{trial.method}-{trial.config_hash[:12]}"
        assert run.data.metrics["final/id_test/accuracy"] == pytest.approx(trial.metrics["id_test"]["accuracy"])
        assert run.data.params["backbone.image_size"] == "32"
    ft = next(r for r in runs if r.data.tags["method"] == "ft")
    assert [m.step for m in client.get_metric_history(ft.info.run_id, "accuracy/id_val")] == [0, 1]


def test_a_failing_tracker_is_a_warning_and_every_trial_is_still_stored(sweep_spec, tmp_path, cache, caplog):
    db = tmp_path / "results.sqlite"
    with caplog.at_level(logging.WARNING, logger="lpft"):
        summary = run_sweep(sweep_spec, db, progress=False, tracker=Broken())
    assert (summary.finished, summary.failed) == (3, 0)
    with Store(db) as store:
        assert store.counts()["finished"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "lpft.runs.tracking"]
    assert len(warnings) == 3 and all("broken (nowhere)" in w and "server down" in w for w in warnings)


# ------------------------------------------------------------------ the command line, in real subprocesses
def lpft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}  # lpft opts in by itself
    env.update(LPFT_CACHE=str(cwd / "cache"), PYTHONPATH=str(ROOT / "src"), MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "lpft.cli", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def _run_args(task: Path) -> list[str]:
    return ["run", str(task), "--backbone", "timm:test_resnet", "--weights", "random", "--image-size", "32",
            "--method", "lp", "--device", "cpu", "--json", "run.json"]


def test_lpft_run_track_mlflow_logs_the_run_to_a_local_store(tmp_path):
    task = write_png_task(tmp_path / "task")
    done = lpft(*_run_args(task), "--track", "mlflow", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _, run = _one_run((tmp_path.resolve() / "mlruns").as_uri(), "tiny-png-digits")
    assert run.data.tags["method"] == "lp" and "final/ood/inverted/accuracy" in run.data.metrics


def test_lpft_run_survives_a_tracker_that_fails(tmp_path):
    task = write_png_task(tmp_path / "task")
    (tmp_path / "a-file").write_text("not a folder")
    done = lpft(*_run_args(task), "--track", "tensorboard:a-file/tb", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "WARNING: tracker tensorboard" in done.stderr and "the run itself is unaffected" in done.stderr
    assert json.loads((tmp_path / "run.json").read_text())["method"] == "lp"


@pytest.mark.parametrize("command", [["run", "no-such-task", "--backbone", "x", "--method", "lp"],
                                     ["sweep", "no-such-spec.yaml"]])
def test_an_unknown_tracker_exits_2_with_one_line_before_any_work(command, tmp_path):
    done = lpft(*command, "--track", "wandb", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"lpft {command[0]}: error: --track wandb: unknown tracker 'wandb'; use mlflow[:URI] or tensorboard[:DIR]"]
