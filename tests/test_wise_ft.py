"""WiSE-FT: the curve from the LP start to the tuned model, alpha chosen on ID validation alone,
end to end through a run, a sweep, its database and its report."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from lpft.backbones import Backbone, create_backbone
from lpft.cli import build_parser
from lpft.data import Task
from lpft.data.splits import ID_TEST, ID_VAL
from lpft.diagnostics.wise import plot_wise_curve, wise_points
from lpft.errors import ConfigError
from lpft.data.loader import SplitData
from lpft.methods import MethodResult, create_method
from lpft.methods.finetuning import FineTuning, LinearProbeThenFineTune, LPFTConfig
from lpft.methods.linear_probe import fit_linear_probe
from lpft.methods.wise_ft import WiseFT, WiseFTConfig, interpolate
from lpft.results.report import load_results, write_report
from lpft.results.selection import IDValidation
from lpft.results.spec import parse_spec
from lpft.results.sweep import run_sweep
from lpft.runs import run
from lpft.runs.artifacts import load_model
from lpft.training import FinetuneConfig, predict_logits

from conftest import small_digits_task, write_png_task

CPU = torch.device("cpu")
# FT from a random head: on this tiny task one epoch of 3 steps at lr 1e-2 lifts ID val from chance (its
# epoch 1 is kept), so the tuned end differs from the LP start in backbone and head. A coarse alpha
# grid keeps the tests fast (the default, 0, 0.1, ..., 1, is checked on the config).
FT = {"tune": "ft", "epochs": 1, "lr": 1e-2, "batch_size": 8, "precision": "fp32", "alpha_steps": 4}
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def lite32():
    return create_backbone("efficientnet-lite0", image_size=32)


@pytest.fixture(scope="module")
def tiny():
    return small_digits_task(per_split=12)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One LPFT_CACHE for the module's shared fit (the ``cache`` fixture is per test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LPFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def fit_wise(task: Task, backbone: Backbone) -> tuple[MethodResult, dict[float, dict[str, np.ndarray]]]:
    """A WiSE-FT (tune: ft) fit, and the logits it produced at every alpha."""
    seen: dict[float, dict[str, np.ndarray]] = {}
    method = WiseFT(WiseFTConfig(**FT))
    method.after_alpha = lambda alpha, logits: seen.__setitem__(alpha, logits)
    return method.fit(task, backbone, CPU), seen


@pytest.fixture(scope="module")
def wise(module_cache, tiny, lite32):
    before = copy.deepcopy(lite32.state_dict())
    result, seen = fit_wise(tiny, lite32)
    for k, v in lite32.state_dict().items():
        assert torch.equal(v, before[k]), f"WiSE-FT modified the backbone it was given ({k})"
    return result, seen


def test_config_grid_flags_and_the_tuned_method():
    config = WiseFTConfig()
    assert (config.tune, config.alpha_steps) == ("lpft", 10)
    assert config.alphas() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert WiseFTConfig(alpha_steps=4).alphas() == ALPHAS
    with pytest.raises(ConfigError, match="tune .* must be one of"):
        WiseFTConfig(tune="lp")
    with pytest.raises(ConfigError, match="alpha_steps .* must be >= 1"):
        WiseFTConfig(alpha_steps=0)
    # a sweep that says nothing follows the paper's protocol of the default tuned method, LP-FT
    spec = parse_spec({"task": "t", "backbone": "b", "methods": {"wise-ft": {}}})
    assert spec.methods["wise-ft"]["lr"] == LPFTConfig.default_grid["lr"]
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "--tune" in help_text and "--alpha-steps" in help_text
    ft = WiseFT(WiseFTConfig(tune="ft", lr=0.01, epochs=3, seed=2)).tuned_method()
    assert type(ft) is FineTuning and ft.config == FinetuneConfig(lr=0.01, epochs=3, seed=2)
    assert type(WiseFT(WiseFTConfig(lr=0.01)).tuned_method()) is LinearProbeThenFineTune


def test_interpolate_mixes_parameters_and_float_buffers_and_keeps_integer_buffers():
    torch.manual_seed(0)
    start, tuned = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    tuned.train()(torch.randn(8, 3))  # moves the running statistics and counts the batch
    a, b = start.state_dict(), tuned.state_dict()
    assert int(b["1.num_batches_tracked"]) == 1 and not torch.equal(a["1.running_var"], b["1.running_var"])
    for alpha, expected in ((0.0, a), (1.0, b)):
        mixed = interpolate(a, b, alpha)
        for key in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
            assert torch.equal(mixed[key], expected[key]), (alpha, key)  # exact at both ends
        assert torch.equal(mixed["1.num_batches_tracked"], b["1.num_batches_tracked"])
    quarter = interpolate(a, b, 0.25)
    for key in ("0.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(quarter[key], 0.75 * a[key] + 0.25 * b[key])
    with pytest.raises(ValueError, match="differ in keys"):
        interpolate({"x": a["0.weight"]}, b, 0.5)


def test_the_curve_runs_from_the_lp_start_to_the_tuned_model(wise, tiny, lite32):
    result, seen = wise
    assert list(seen) == ALPHAS
    _, lp_logits = fit_linear_probe(tiny, lite32, CPU)
    ft_settings = {k: v for k, v in FT.items() if k not in ("tune", "alpha_steps")}
    tuned = create_method("ft", ft_settings).fit(tiny, lite32, CPU)
    assert tuned.selected["epoch"] == 1, "the tuned end must differ from the start for this test to mean anything"
    for key, _ in tiny.eval_splits():
        np.testing.assert_allclose(seen[0.0][key], lp_logits[key], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(seen[1.0][key], tuned.logits[key], rtol=1e-4, atol=1e-4)
    assert not np.allclose(seen[0.0][ID_VAL], seen[1.0][ID_VAL], atol=1e-2)


def test_alpha_is_the_smallest_best_on_id_val_and_the_result_is_that_model(wise, tiny):
    result, seen = wise
    curve = result.diagnostics["wise_curve"]
    assert [row["alpha"] for row in curve] == ALPHAS
    for row in curve:
        assert set(row["accuracy"]) == {key for key, _ in tiny.eval_splits()}
        for key, split in tiny.eval_splits():
            correct = seen[row["alpha"]][key].argmax(1) == split.labels
            assert row["accuracy"][key] == pytest.approx(float(correct.mean()))
    id_val = [row["accuracy"][ID_VAL] for row in curve]
    chosen = result.selected["alpha"]
    assert chosen == ALPHAS[int(np.argmax(id_val))]  # argmax: the first, i.e. smallest, of tied alphas
    assert set(result.selected) == {"alpha", "epoch", "lp_C"}
    tuned_val = [h["accuracy"][ID_VAL] for h in result.history]
    assert result.selected["epoch"] == result.history[int(np.argmax(tuned_val))]["tuned_epoch"]
    for key, _ in tiny.eval_splits():
        np.testing.assert_array_equal(result.logits[key], seen[chosen][key])
    again = predict_logits(result.model, SplitData(result.model.backbone, tiny.id_val), CPU)
    np.testing.assert_allclose(again, result.logits[ID_VAL], rtol=1e-4, atol=1e-4)
    assert result.tuned_backbone == (chosen > 0)
    assert [h["tuned_epoch"] for h in result.history] == [0, 1] and all("epoch" not in h for h in result.history)
    json.dumps([result.selected, result.diagnostics], allow_nan=False)


def test_no_choice_reads_id_test_or_an_ood_split(wise, tiny, lite32):
    result, _ = wise
    rng = np.random.default_rng(1)
    shuffle = lambda split: dataclasses.replace(split, labels=rng.permutation(split.labels))  # noqa: E731
    scrambled = dataclasses.replace(tiny, id_test=shuffle(tiny.id_test),
                                    ood={k: shuffle(s) for k, s in tiny.ood.items()})
    other, _ = fit_wise(scrambled, lite32)
    before, after = result.diagnostics["wise_curve"], other.diagnostics["wise_curve"]
    assert [r["accuracy"][ID_VAL] for r in after] == [r["accuracy"][ID_VAL] for r in before]
    assert [r["accuracy"][ID_TEST] for r in after] != [r["accuracy"][ID_TEST] for r in before]
    assert [r["accuracy"]["ood/inverted"] for r in after] != [r["accuracy"]["ood/inverted"] for r in before]
    assert other.selected == result.selected


def test_a_run_records_the_curve_and_reports_its_own_accuracies(cache, tiny, tmp_path):
    record = run(tiny, "efficientnet-lite0", "wise-ft", FT, "cpu", backbone_options={"image_size": 32},
                 save=tmp_path / "run")
    assert record.method == "wise-ft" and record.hyperparameters["tune"] == "ft"
    assert record.hyperparameters["alpha_steps"] == 4
    row = next(r for r in record.diagnostics["wise_curve"] if r["alpha"] == record.selected["alpha"])
    assert {k: m["accuracy"] for k, m in record.metrics.items()} == pytest.approx(row["accuracy"])
    # selection rules see the run's one result, not the tuned run's epochs
    (selection,) = IDValidation().select([record])
    (choice,) = selection.choices
    assert choice.epoch is None and choice.accuracy == {k: m["accuracy"] for k, m in record.metrics.items()}
    model, _ = load_model(tmp_path / "run")
    saved = predict_logits(model, SplitData(model.backbone, tiny.id_val), CPU)
    assert float((saved.argmax(1) == tiny.id_val.labels).mean()) == record.metrics[ID_VAL]["accuracy"]


def test_a_sweep_stores_the_curve_and_the_report_and_plot_read_it(cache, tmp_path):
    task = write_png_task(tmp_path / "task")
    spec = parse_spec({"name": "wise", "task": str(task), "backbone": "efficientnet-lite0",
                       "backbone_options": {"image_size": 32}, "seeds": [0],
                       "methods": {"wise-ft": {**FT, "lr": [3e-3]}}})
    summary = run_sweep(spec, tmp_path / "r.sqlite", "cpu", progress=False)
    assert (summary.finished, summary.failed) == (1, 0)
    (record,) = load_results(tmp_path / "r.sqlite")
    curve = record.diagnostics["wise_curve"]
    assert [r["alpha"] for r in curve] == ALPHAS and "alpha" in record.selected
    report = write_report([record], tmp_path / "report", [IDValidation()])
    (table,) = report.tables
    (row,) = table.rows
    assert row.label == "WiSE-FT" and row.cells[ID_TEST].mean == record.metrics[ID_TEST]["accuracy"]
    assert f"chosen alpha per seed: {record.selected['alpha']:.3g}" in row.chosen  # the alpha it kept, shown
    assert any(p.name.endswith("_wise_curve.png") for p in report.images)  # the report draws the curve
    points = wise_points(record)
    assert [p[0] for p in points] == ALPHAS
    assert points[0][1:] == (curve[0]["accuracy"][ID_TEST], curve[0]["accuracy"]["ood/inverted"])
    path = plot_wise_curve([record], tmp_path / "wise.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
