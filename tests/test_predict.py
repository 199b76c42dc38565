"""Runs you can reuse: every method's saved run predicts new data through `lpft predict` and `load_model`."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from lpft.cli import main as cli_main
from lpft.errors import RunError
from lpft.runs.artifacts import HEAD_FILE, WEIGHTS_FILE, load_model, load_run

from conftest import write_png_task


@pytest.fixture(scope="module")
def png_task(tmp_path_factory):
    return write_png_task(tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("method", ["lp", "ft", "lpft"])
def test_saved_run_predicts_what_it_scored(method, png_task, cache, tmp_path):
    run_dir = tmp_path / method
    flags = [] if method == "lp" else ["--epochs", "1", "--batch-size", "16", "--lr", "1e-3"]
    assert cli_main(["run", str(png_task), "--backbone", "efficientnet-lite0", "--image-size", "32", "--method", method,
                     *flags, "--device", "cpu", "--out", str(run_dir)]) == 0
    assert (run_dir / HEAD_FILE).is_file() and (run_dir / WEIGHTS_FILE).is_file() == (method != "lp")
    record = load_run(run_dir).record
    assert record.spec["method"] == method and record.spec["backbone_options"] == {"image_size": 32}
    assert record.environment["command"] and record.environment["started_at"]  # the process's command line, when

    # test.csv is the task's id_test split: predictions must be the saved run's own argmax there
    out = tmp_path / f"{method}.csv"
    assert cli_main(["predict", str(run_dir), str(png_task.parent / "test.csv"), "--csv", str(out), "--device", "cpu"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    model, classes = load_model(run_dir)
    saved = load_run(run_dir).logits["id_test"]
    assert [r["predicted"] for r in rows] == [classes[k] for k in saved.argmax(1)]
    probs = np.array([[float(r[f"p({c})"]) for c in classes] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
    assert isinstance(model, torch.nn.Module) and not model.training


def test_a_run_without_a_model_cannot_predict(tmp_path):
    with pytest.raises(RunError, match="not a saved run"):
        load_model(tmp_path)


def test_a_saved_run_is_never_mixed_with_an_older_one(png_task, cache, tmp_path, capsys):
    """Saving LP over an FT run is refused; with --overwrite nothing of the FT run survives (its weights)."""
    run_dir = tmp_path / "run"
    common = ["--backbone", "efficientnet-lite0", "--image-size", "32", "--device", "cpu", "--out", str(run_dir)]
    assert cli_main(["run", str(png_task), "--method", "ft", "--epochs", "1", "--batch-size", "16", *common]) == 0
    assert (run_dir / WEIGHTS_FILE).is_file()
    assert cli_main(["run", str(png_task), "--method", "lp", *common]) == 2
    assert "already holds a saved run" in capsys.readouterr().err
    assert cli_main(["run", str(png_task), "--method", "lp", *common, "--overwrite"]) == 0
    assert not (run_dir / WEIGHTS_FILE).exists() and load_run(run_dir).record.method == "lp"


@pytest.mark.parametrize("option, name", [("--json", "out.json"), ("--out", "run")])
def test_outputs_are_checked_before_any_work(png_task, cache, tmp_path, capsys, option, name):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert cli_main(["run", str(png_task), "--backbone", "efficientnet-lite0", "--method", "lp",
                     option, str(blocked / name)]) == 2
    assert option in capsys.readouterr().err
    assert not (cache / "features").exists(), "nothing was extracted before the output was found unwritable"
