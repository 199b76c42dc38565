"""L2-SP, layer-wise learning-rate decay and surgical fine-tuning, and the depth-ordered blocks they
read from every registered backbone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lpft.backbones import create_backbone
from lpft.diagnostics import weight_change
from lpft.errors import ConfigError
from lpft.methods import MethodResult, create_method
from lpft.methods.l2sp import L2SP, L2SPConfig
from lpft.methods.llrd import decayed_groups
from lpft.methods.surgical import GROUPS, block_group
from lpft.results.report import load_results
from lpft.results.selection import IDValidation
from lpft.results.spec import parse_spec
from lpft.results.sweep import run_sweep
from lpft.runs import run
from lpft.training import Classifier

from conftest import small_digits_task, write_png_task
from test_contracts import BACKBONE_EXAMPLES, _minilm_dir

CPU = torch.device("cpu")
LITE = "efficientnet-lite0"
QUICK = {"epochs": 1, "batch_size": 16, "lr": 1e-2, "eval_all_splits_each_epoch": False}  # beats the random start
# registry entry -> (number of blocks, first block, last block)
EXPECTED_BLOCKS = {
    LITE: (18, "net._conv_stem+net._bn0", "net._conv_head+net._bn1"),
    "minilm-l6": (7, "encoder.embeddings", "encoder.encoder.layer.5+encoder.pooler"),
    "hf:<name>": (7, "encoder.embeddings", "encoder.encoder.layer.5+encoder.pooler"),
    "timm:<name>": (9, "net.conv1+net.bn1", "net.layer4.1"),
    "torchvision:<name>": (9, "net.conv1+net.bn1", "net.layer4.1"),
}


@pytest.fixture(scope="module")
def task():
    return small_digits_task(per_split=20)


@pytest.fixture(scope="module")
def lite32():
    return create_backbone(LITE, image_size=32)


@pytest.fixture(scope="module")
def fit(task, lite32, tmp_path_factory):
    """``fit(method, **settings)``: the method's result on the tiny task, computed once per module."""
    results: dict[str, MethodResult] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LPFT_CACHE", str(tmp_path_factory.mktemp("cache")))

        def fit_once(method: str, **settings) -> MethodResult:
            instance = create_method(method, {**QUICK, **settings})
            key = f"{method}{sorted(instance.config.to_dict().items())}"
            if key not in results:
                results[key] = instance.fit(task, lite32, CPU)
            return results[key]

        yield fit_once


@pytest.mark.parametrize("entry", sorted(BACKBONE_EXAMPLES))
def test_blocks_cover_every_trainable_parameter_once_in_data_flow_order(entry):
    name, options = BACKBONE_EXAMPLES[entry]
    backbone = create_backbone(name or f"hf:{_minilm_dir()}", **options)
    blocks = backbone.blocks()
    assert len(blocks) > 2
    index = {id(p): i for i, block in enumerate(blocks) for p in block.parameters}
    assert sum(len(block.parameters) for block in blocks) == len(index), "a parameter is in two blocks"
    assert index.keys() == {id(p) for p in backbone.trainable_parameters()}
    if entry in EXPECTED_BLOCKS:
        assert (len(blocks), blocks[0].name, blocks[-1].name) == EXPECTED_BLOCKS[entry]

    # input -> output: the modules the forward runs hold parameters of non-decreasing blocks, from block 0
    order: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda m, _, order=order: order.extend(
        sorted({index[id(p)] for p in m.parameters(recurse=False) if id(p) in index})))
        for m in backbone.modules() if any(id(p) in index for p in m.parameters(recurse=False))]
    if backbone.modality == "image":
        inputs = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    else:
        inputs = ["a short one", "a somewhat longer sentence about the weather today"]
    backbone.eval()
    with torch.no_grad():
        backbone.features(backbone.preprocess(inputs))
    for hook in hooks:
        hook.remove()
    assert order[0] == 0 and order == sorted(order), f"blocks out of data-flow order: {order}"


def test_l2sp_at_lambda_zero_is_ft_and_with_the_lp_head_lpft(fit):
    for reference, head, lr in (("ft", "random", 1e-2), ("lpft", "lp", 1e-3)):
        base, l2sp = fit(reference, lr=lr), fit("l2-sp", l2sp_lambda=0.0, head=head, lr=lr)
        assert l2sp.history == base.history and l2sp.selected == base.selected
        for key, logits in base.logits.items():
            np.testing.assert_array_equal(l2sp.logits[key], logits)
    assert "lp_C" in fit("l2-sp", l2sp_lambda=0.0, head="lp", lr=1e-3).selected


def test_l2sp_penalty_is_half_lambda_times_squared_distance_on_the_backbone_only(lite32):
    model = Classifier(copy.deepcopy(lite32), 3)
    penalty = L2SP(L2SPConfig(l2sp_lambda=0.3)).penalty(model)
    model.to(memory_format=torch.channels_last)  # as the training loop does after building the penalty
    assert float(penalty(model).detach()) == 0.0
    stem = model.backbone.net._conv_stem.weight
    with torch.no_grad():
        stem.add_(0.1)
        model.head.weight.add_(5.0)  # the head is not anchored
    value = penalty(model)
    assert float(value.detach()) == pytest.approx(0.5 * 0.3 * 0.1**2 * stem.numel(), rel=1e-4)
    value.backward()
    torch.testing.assert_close(stem.grad, torch.full_like(stem, 0.3 * 0.1))
    assert model.head.weight.grad is None
    assert L2SP(L2SPConfig(l2sp_lambda=0.0)).penalty(model) is None


def test_a_large_l2sp_lambda_keeps_the_backbone_closer_to_its_pretrained_weights(fit, lite32):
    free, anchored = fit("l2-sp", l2sp_lambda=0.0), fit("l2-sp", l2sp_lambda=100.0)
    assert free.selected["epoch"] == anchored.selected["epoch"] == 1, "both must keep their trained epoch"
    moved = weight_change(lite32, free.model.backbone)["total"]
    assert 0 < weight_change(lite32, anchored.model.backbone)["total"] < 0.75 * moved


def test_llrd_groups_decay_from_the_head_down_and_at_one_is_ft(fit, lite32):
    model = Classifier(copy.deepcopy(lite32), 3)
    groups = decayed_groups(model, 0.1, 0.5)
    assert [g["name"] for g in groups[-2:]] == ["net._conv_head+net._bn1", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * 0.5**k for k in range(18, -1, -1)])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ConfigError, match="lr_decay .* must be <= 1"):
        create_method("llrd", {"lr_decay": 1.5})

    ft, flat = fit("ft", lr=1e-2), fit("llrd", lr_decay=1.0)
    assert flat.history == ft.history
    for key, logits in ft.logits.items():
        np.testing.assert_array_equal(flat.logits[key], logits)
    # at decay 0.5 the stem trains at 0.5**18 of the lr: it barely moves while FT's does
    decayed = fit("llrd", lr_decay=0.5)
    assert decayed.selected["epoch"] == ft.selected["epoch"] == 1
    stem = {name: [b for b in weight_change(lite32, r.model.backbone)["blocks"] if b["block"] == "net._conv_stem"][0]
            for name, r in (("ft", ft), ("llrd", decayed))}
    assert stem["llrd"]["relative_change"] < 1e-3 * stem["ft"]["relative_change"]
    assert decayed.diagnostics["lr_multipliers"]["net._conv_stem+net._bn0"] == pytest.approx(0.5**18)


def test_surgical_changes_only_its_group_and_the_head(fit, lite32):
    blocks = lite32.blocks()
    thirds = [block_group(blocks, g) for g in GROUPS]
    assert [[b.name for b in t] for t in thirds] == [[b.name for b in blocks[i : i + 6]] for i in (0, 6, 12)]
    result = fit("surgical", group="middle")
    assert result.selected["epoch"] == 1 and result.diagnostics["tuned_blocks"] == [b.name for b in thirds[1]]
    tuned = {id(p) for b in thirds[1] for p in b.parameters}
    for (name, before), after in zip(lite32.named_parameters(), result.model.backbone.parameters(), strict=True):
        assert torch.equal(before, after) != (id(before) in tuned), f"{name}: changed outside the group or kept in it"
    assert all(p.requires_grad for p in result.model.parameters()), "the handed-back model is trainable again"
    assert result.diagnostics["first_step"]["grad_norm_backbone"] > 0


@pytest.mark.parametrize(("method", "settings"), [
    ("l2-sp", {"l2sp_lambda": 0.1}),
    ("llrd", {"lr_decay": 0.7}),
    ("surgical", {"group": "early"}),
])
def test_each_method_runs_end_to_end_and_records_its_knobs(cache, task, method, settings):
    record = run(task, LITE, method, {**QUICK, **settings}, "cpu", backbone_options={"image_size": 32})
    assert record.method == method and settings.items() <= record.hyperparameters.items()
    assert set(record.metrics) == {"id_val", "id_test", "ood/inverted"}
    assert all(np.isfinite(m["nll"]) and 0 <= m["accuracy"] <= 1 for m in record.metrics.values())
    kept = record.history[record.selected["epoch"]]  # chosen on ID validation: its best epoch
    assert kept["accuracy"]["id_val"] == record.metrics["id_val"]["accuracy"] == max(
        h["accuracy"]["id_val"] for h in record.history)


def test_a_surgical_sweep_tries_every_group_and_id_validation_chooses(cache, tmp_path):
    spec = parse_spec({"name": "surgical", "task": str(write_png_task(tmp_path / "task")), "backbone": LITE,
                       "backbone_options": {"image_size": 32}, "seeds": [0],
                       "methods": {"surgical": {**QUICK, "eval_all_splits_each_epoch": True}}})
    assert spec.methods["surgical"]["group"] == list(GROUPS)  # the method's own default grid
    summary = run_sweep(spec, tmp_path / "r.sqlite", "cpu", progress=False)
    assert (summary.finished, summary.failed) == (3, 0)
    records = load_results(tmp_path / "r.sqlite")
    tuned = {r.hyperparameters["group"]: r.diagnostics["tuned_blocks"] for r in records}
    assert sum((tuned[g] for g in GROUPS), []) == [b.name for b in create_backbone(LITE, image_size=32).blocks()]
    (selection,) = IDValidation().select(records)
    best = {r.hyperparameters["group"]: max(h["accuracy"]["id_val"] for h in r.history) for r in records}
    assert best[selection.hyperparameters["group"]] == max(best.values())
