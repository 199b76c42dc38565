"""Features cache, LP / FT / LP-FT contracts and end-to-end runs on small real tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lpft.features as features_module
from lpft.backbones import create_backbone
from lpft.cli import main as cli_main
from lpft.errors import BackboneError, ConfigError
from lpft.features import cached_features, feature_cache_key
from lpft.methods import create_method, method_names
from lpft.methods.finetuning import LinearProbeThenFineTune, LPFTConfig
from lpft.methods.linear_probe import fit_linear_probe
from lpft.runs import run_method

from conftest import TEXT_TOPICS

CPU = torch.device("cpu")
# LP-FT starts from a fitted head, so (as in the paper) it takes a ~10x smaller learning rate
FAST = {"lp": {}, "ft": {"epochs": 2, "lr": 3e-3, "batch_size": 32}, "lpft": {"epochs": 2, "lr": 3e-4, "batch_size": 32}}


@pytest.fixture(scope="module")
def lite32():
    return create_backbone("efficientnet-lite0", image_size=32)


def test_registered_methods():
    assert {"lp", "ft", "lpft"} <= set(method_names())
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        create_method("nope")


def test_feature_cache_is_reused_and_keyed_by_preprocessing(cache, digits_task, lite32, monkeypatch):
    first = cached_features(lite32, digits_task.train)
    assert first.shape == (len(digits_task.train), 1280) and np.isfinite(first).all()
    assert len(list((cache / "features").rglob("*.npy"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(features_module, "compute_features", must_not_run)
    np.testing.assert_array_equal(cached_features(lite32, digits_task.train), first)
    other_size = create_backbone("efficientnet-lite0", image_size=40)
    assert feature_cache_key(other_size, digits_task.train) != feature_cache_key(lite32, digits_task.train)
    assert feature_cache_key(lite32, digits_task.id_val) != feature_cache_key(lite32, digits_task.train)


def test_lpft_first_step_starts_from_the_lp_head(cache, digits_task, lite32):
    probe, _ = fit_linear_probe(digits_task, lite32, CPU)
    seen = {}

    def capture(step, model):
        seen.setdefault(step, model.head.weight.detach().clone())
        if step == 0:
            seen["bias"] = model.head.bias.detach().clone()

    method = LinearProbeThenFineTune(LPFTConfig(epochs=1, lr=1e-3, batch_size=32))
    method.before_step = capture
    result = method.fit(digits_task, lite32, CPU)
    torch.testing.assert_close(seen[0], torch.as_tensor(probe.coef_, dtype=torch.float32))
    torch.testing.assert_close(seen["bias"], torch.as_tensor(probe.intercept_, dtype=torch.float32))
    # the head moved during training, and the backbone given to the method did not
    assert not torch.equal(seen[1], seen[0])
    kept = result.selected["epoch"]
    assert torch.equal(result.model.head.weight.detach(), seen[0]) == (kept == 0), "epoch 0 is the start, unchanged"
    fresh = create_backbone("efficientnet-lite0", image_size=32)
    for (name, p), q in zip(lite32.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), f"{name} changed: methods must not modify the backbone they are given"


def test_ft_and_lpft_differ_only_in_head_init(cache, digits_task, lite32):
    heads = {}
    for name in ("ft", "lpft"):
        method = create_method(name, {"epochs": 1, "batch_size": 32})
        method.before_step = lambda step, model, name=name: heads.setdefault(name, model.head.weight.detach().clone())
        method.fit(digits_task, lite32, CPU)
    assert not torch.allclose(heads["ft"], heads["lpft"])


@pytest.mark.parametrize("method", ["lp", "ft", "lpft"])
def test_end_to_end_image_run(cache, digits_task, lite32, method):
    record, result = run_method(digits_task, lite32, create_method(method, FAST[method]), CPU)
    assert set(record.metrics) == {"id_val", "id_test", "ood/inverted"}
    for split, m in record.metrics.items():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["nll"] > 0 and 0 <= m["ece"] <= 1
    assert record.metrics["id_test"]["accuracy"] > 0.6, "3 digit classes: far above chance (0.33) expected"
    if method == "lp":
        assert "C" in record.selected
    else:
        assert 0 <= record.selected["epoch"] <= FAST[method]["epochs"]
        assert [h["epoch"] for h in record.history] == list(range(FAST[method]["epochs"] + 1))  # 0: the start


def test_cli_run_text_task_writes_json(cache, tmp_path):
    out = tmp_path / "out.json"
    code = cli_main([
        "run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "lpft",
        "--epochs", "1", "--lr", "1e-4", "--batch-size", "16", "--json", str(out),
    ])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["task"] == "text-topics" and payload["backbone"] == "minilm-l6" and payload["method"] == "lpft"
    assert payload["hyperparameters"]["epochs"] == 1 and payload["hyperparameters"]["lr"] == 1e-4
    assert set(payload["metrics"]) == {"id_val", "id_test", "ood/casual", "ood/questions"}
    assert payload["metrics"]["id_test"]["accuracy"] > 0.5, "4 topics, a strong sentence encoder: well above 0.25"


def test_backbone_modality_mismatch_is_reported(digits_task):
    from lpft.runs import run

    with pytest.raises(BackboneError, match="reads text but task 'tiny-digits' is a image task"):
        run(digits_task, "minilm-l6", "lp")


def test_lpft_keeps_its_start_when_fine_tuning_only_hurts(cache, digits_task, lite32):
    """Epoch 0 (the linear probe) is a candidate: AdamW at lr 1e-2 wrecks the features in one epoch,
    so ID-validation selection keeps the probe, and the run says so."""
    probe, probe_logits = fit_linear_probe(digits_task, lite32, CPU)
    record, result = run_method(digits_task, lite32, create_method("lpft", {"epochs": 1, "lr": 1e-2, "optimizer": "adamw",
                                                                            "batch_size": 16}), CPU)
    start, after = record.history
    assert after["accuracy"]["id_val"] < start["accuracy"]["id_val"], "the setting must hurt for this test to mean anything"
    assert record.selected["epoch"] == 0
    np.testing.assert_allclose(result.logits["id_test"], probe_logits["id_test"], rtol=1e-4, atol=1e-4)
    # the fitted head's first step is compared with FT's seeded random head on the same batch
    d = record.diagnostics
    assert d["first_step_random_head"]["loss"] == pytest.approx(np.log(3), abs=0.15)  # near-uniform, 3 classes
    assert d["first_step"]["loss"] < d["first_step_random_head"]["loss"]
    assert d["backbone_gradient_ratio"] == pytest.approx(
        d["first_step"]["grad_norm_backbone"] / d["first_step_random_head"]["grad_norm_backbone"])


def test_divergence_stops_the_run_at_that_step(cache, digits_task, lite32):
    from lpft.errors import RunError

    with pytest.raises(RunError, match=r"diverged at epoch 1, step [12] of \d+: .*peak lr 1e\+08\); lower --lr"):
        run_method(digits_task, lite32, create_method("ft", {"epochs": 2, "lr": 1e8, "batch_size": 16}), CPU)
    with pytest.raises(ConfigError, match="finite"):
        create_method("ft", {"lr": float("nan")})
