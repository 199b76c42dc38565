"""LoRA (through peft) and SPD: what each trains, where it starts, and that both run and sweep."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lpft.backbones import create_backbone
from lpft.errors import BackboneError, ConfigError
from lpft.methods import create_method, method_label
from lpft.methods import lora as lora_module
from lpft.methods.linear_probe import fit_linear_probe
from lpft.methods.lora import LoRA, LoRAConfig
from lpft.methods.spd import AdamWSPD, SelectiveProjectionDecay, SPDConfig
from lpft.results.report import load_results
from lpft.results.spec import parse_spec
from lpft.results.sweep import run_sweep
from lpft.runs import run, run_method
from lpft.runs.artifacts import load_model, load_run
from lpft.runs.pipeline import create_backbone_once, load_task_once

from conftest import TEXT_TOPICS, small_digits_task, write_png_task

CPU = torch.device("cpu")
# one short fp32 epoch, id_val scored per epoch and every other split once at the end
QUICK = {"epochs": 1, "precision": "fp32", "eval_all_splits_each_epoch": False}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _base_weights(state: dict[str, torch.Tensor], wrapper: str) -> dict[str, torch.Tensor]:
    """An adapted model's pretrained weights under their original names (peft's wrappers removed)."""
    return {k.replace(f"{wrapper}.model.", f"{wrapper}.").replace(".base_layer", ""): v
            for k, v in state.items() if "lora_" not in k}


def test_settings_are_checked(monkeypatch):
    assert LoRAConfig().optimizer == "adamw" and LoRAConfig.default_grid["rank"] == [4, 8, 16]
    with pytest.raises(ConfigError, match=r"dropout \(LoRAConfig\) must be < 1"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"head \(LoRAConfig\) must be one of \['random', 'lp'\]"):
        create_method("lora", {"head": "zero"})
    with pytest.raises(ConfigError, match=r"optimizer \(SPDConfig\) must be one of \['adamw'\]"):
        create_method("spd", {"optimizer": "sgd"})
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match=r"method lora needs the package `peft`: pip install \"lpft\[lora\]\""):
        LoRA().fit(load_task_once(str(TEXT_TOPICS)), create_backbone_once("minilm-l6"), CPU)


def test_lora_run_trains_only_adapters_and_head_and_saves_a_merged_model(cache, tmp_path, monkeypatch):
    """Through lpft.runs.run: base weights bit-identical while adapters train; the saved model reloads without peft."""
    pretrained = create_backbone_once("minilm-l6")  # the object run() adapts (a copy of)
    before = _snapshot(pretrained)
    seen: dict[str, dict] = {}
    merge = lora_module.merge_adapters

    def capture_then_merge(model):
        seen["trained"] = _snapshot(model)
        merge(model)

    monkeypatch.setattr(lora_module, "merge_adapters", capture_then_merge)
    record = run(str(TEXT_TOPICS), "minilm-l6", "lora", {**QUICK, "batch_size": 40, "lr": 3e-3, "rank": 4}, "cpu",
                 save=tmp_path / "run")
    assert record.selected["epoch"] == 1, "the trained adapters must be the ones kept for the checks below to mean anything"
    trained = seen["trained"]
    base = _base_weights(trained, "encoder")
    assert base.keys() == {f"backbone.{k}" for k in before} | {"head.weight", "head.bias"}
    for key, value in before.items():
        assert torch.equal(base[f"backbone.{key}"], value), f"LoRA changed the pretrained weight {key}"
    lora_b = {k: v for k, v in trained.items() if "lora_B" in k}  # zero at the start
    assert len(lora_b) == 12 and all(k.split(".lora_B")[0].endswith(("query", "value")) for k in lora_b)
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    # 6 layers x (query, value) x rank 4 x (384 inputs + 384 outputs)
    assert record.hyperparameters["rank"] == 4 and record.diagnostics["adapter_parameters"] == 12 * 4 * 768
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, before[key]), f"the backbone given to the method changed ({key})"

    model, _ = load_model(tmp_path / "run")  # rebuilt from the registry: the merged weights fit it exactly
    changed = {k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.endswith(("query.weight", "value.weight"))}
    task = load_task_once(str(TEXT_TOPICS))
    with torch.no_grad():
        logits = model(model.backbone.preprocess(task.id_test.inputs)).numpy()
    np.testing.assert_allclose(logits, load_run(tmp_path / "run").logits["id_test"], atol=1e-4)


def test_lora_lp_head_is_the_probe_of_the_pretrained_backbone(cache):
    """head=lp starts from the probe fitted on cached features of the unadapted backbone; adapters go into a copy."""
    task, backbone = load_task_once(str(TEXT_TOPICS)), create_backbone_once("minilm-l6")
    model, selected = LoRA(LoRAConfig(head="lp")).initial_model(task, backbone, CPU)
    probe, _ = fit_linear_probe(task, backbone, CPU)
    torch.testing.assert_close(model.head.weight.detach(), torch.as_tensor(probe.coef_, dtype=torch.float32))
    torch.testing.assert_close(model.head.bias.detach(), torch.as_tensor(probe.intercept_, dtype=torch.float32))
    assert selected == {"lp_C": float(probe.best_C_)}
    assert any("lora_" in name for name, _ in model.named_parameters())
    assert not any("lora_" in name for name, _ in backbone.named_parameters())
    sidecars = [json.loads(p.read_text()) for p in (cache / "features").rglob("*.json")]
    assert len(sidecars) == 5 and {s["fingerprint"] for s in sidecars} == {backbone.fingerprint}

    random_start, chosen = LoRA(LoRAConfig(head="random")).initial_model(task, backbone, CPU)
    assert chosen == {} and not torch.allclose(random_start.head.weight, model.head.weight)


def test_lora_adapts_a_timm_vit_and_refuses_a_cnn(cache):
    task = small_digits_task(per_split=20)
    vit = create_backbone("timm:test_vit", weights="random")  # timm's 0.3M-parameter ViT (160 px)
    before = _snapshot(vit)
    seen = {}
    method = LoRA(LoRAConfig(**QUICK, batch_size=20, lr=1e-2, rank=2))
    method.before_step = lambda step, model: seen.update(state=_snapshot(model))  # the last: after one update
    result = method.fit(task, vit, CPU)
    assert {k for k, _ in task.eval_splits()} <= result.logits.keys()
    trained = seen["state"]
    lora_a = [k for k in trained if "lora_A" in k]
    assert len(lora_a) == 6 and all(".attn.qkv.lora_A" in k for k in lora_a)
    base = _base_weights(trained, "net")
    for key, value in before.items():
        assert torch.equal(base[f"backbone.{key}"], value), f"LoRA changed the pretrained weight {key}"
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)

    cnn = create_backbone("timm:resnet18", weights="random", image_size=32)
    with pytest.raises(BackboneError, match=r"LoRA cannot adapt 'timm:resnet18'.*timm ViTs \(timm:vit_\*"):
        LoRA(LoRAConfig(head="lp")).fit(task, cnn, CPU)
    assert not (cache / "features").exists(), "the backbone is refused before the LP stage runs"
    for key, value in vit.state_dict().items():
        assert torch.equal(value, before[key]), f"the backbone given to the method changed ({key})"


# step 2: w's gradient points back toward w0 (selected) but Adam's momentum still carries it away;
# `free` keeps descending away from w0, a consistent layer that is never selected
GRADIENTS = [(torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0])), (torch.tensor([0.01, 0.0]), torch.tensor([1.0, 0.0]))]


def _two_steps(optimizer: type[torch.optim.Optimizer], **options) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``w`` and ``free`` (both starting at w0 = 0) after the two steps, and w's distance to w0 after each."""
    w, free = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = optimizer([{"params": [w, free], "anchors": [torch.zeros(2), torch.zeros(2)]}], lr=0.1, **options)
    distances = []
    for w.grad, free.grad in GRADIENTS:
        opt.step()
        distances.append(float(w.detach().norm()))
    return w.detach(), free.detach(), distances


def test_spd_projects_only_a_selected_layer_and_is_adamw_without_strength():
    w_adamw, free_adamw, adamw = _two_steps(torch.optim.AdamW)  # AdamW ignores the anchors
    assert adamw[1] > adamw[0], "the example needs AdamW's step to carry w further from w0"
    w_zero, free_zero, _ = _two_steps(AdamWSPD, spd_lambda=0.0)
    assert torch.equal(w_zero, w_adamw) and torch.equal(free_zero, free_adamw)
    _, free_spd, spd = _two_steps(AdamWSPD, spd_lambda=1.0)
    assert spd[0] == adamw[0], "nothing is selected at the first step (w = w0)"
    assert spd[1] == pytest.approx(spd[0], rel=1e-6), "lambda=1 holds the selected layer at its distance"
    assert torch.equal(free_spd, free_adamw), "the consistent layer is not selected: plain AdamW"


def test_spd_at_zero_strength_is_adamw_fine_tuning_and_keeps_closer_to_w0(cache):
    task = small_digits_task(per_split=20)
    backbone = create_backbone("timm:test_efficientnet", weights="random", image_size=32)  # 0.1M parameters
    settings = {**QUICK, "epochs": 2, "batch_size": 8, "lr": 1e-2}

    def distance_to_w0(model) -> float:
        pairs = zip(model.backbone.parameters(), backbone.parameters(), strict=True)
        return sum(float((p - p0).detach().pow(2).sum()) for p, p0 in pairs) ** 0.5

    last = {}  # the distance before the last step, whichever epoch ID validation keeps

    def fit_spd(strength: float):
        method = SelectiveProjectionDecay(SPDConfig(**settings, spd_lambda=strength))
        method.before_step = lambda step, model: last.update({strength: distance_to_w0(model)})
        return run_method(task, backbone, method, CPU)[1]

    _, ft = run_method(task, backbone, create_method("ft", {**settings, "optimizer": "adamw"}), CPU)
    plain = fit_spd(0.0)
    for key, logits in ft.logits.items():
        np.testing.assert_array_equal(plain.logits[key], logits, err_msg=key)
    fit_spd(1.0)
    assert 0 < last[1.0] < last[0.0]


def test_spd_sweeps_through_spec_store_and_results(cache, tmp_path):
    defaults = parse_spec({"task": "t", "backbone": "b", "methods": {"spd": {}, "lora": {}}}).methods
    assert defaults["spd"]["spd_lambda"] == [0.1, 0.5, 1.0] and defaults["lora"]["rank"] == [4, 8, 16]
    spec = parse_spec({"name": "spd", "task": str(write_png_task(tmp_path / "png")), "backbone": "timm:test_efficientnet",
                       "backbone_options": {"weights": "random", "image_size": 32}, "seeds": [0],
                       "methods": {"spd": {**QUICK, "batch_size": 16, "lr": 1e-3, "spd_lambda": [0.5, 1.0]}}})
    summary = run_sweep(spec, tmp_path / "r.sqlite", "cpu", progress=False)
    assert (summary.finished, summary.failed) == (2, 0)
    records = load_results(tmp_path / "r.sqlite")
    assert {r.method for r in records} == {"spd"} and method_label("spd") == "SPD"
    assert sorted(r.hyperparameters["spd_lambda"] for r in records) == [0.5, 1.0]
    assert all(set(r.metrics) == {"id_val", "id_test", "ood/inverted"} for r in records)
