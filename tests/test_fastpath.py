"""The training loop's fast paths: how "auto" resolves, and that each lever leaves results unchanged."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from lpft.backbones import create_backbone
from lpft.commands.common import add_method_arguments, method_settings
from lpft.errors import ConfigError
from lpft.data.loader import SplitData
from lpft.features import compute_features
from lpft.training import Classifier, FinetuneConfig, finetune, predict_logits, resolve_fast_path

from conftest import small_digits_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return create_backbone("timm:test_resnet", weights="random", image_size=32)


def _run(backbone, task, **levers) -> tuple[Classifier, dict]:
    torch.manual_seed(0)
    backbone = copy.deepcopy(backbone)  # training updates it in place; every run starts from the same weights
    model = Classifier(backbone, task.num_classes)
    train = SplitData(backbone, task.train)
    evals = {k: SplitData(backbone, s) for k, s in task.eval_splits()}
    config = FinetuneConfig(epochs=2, lr=0.05, batch_size=16, **levers)
    result = finetune(model, train, evals, config, CPU, progress=False)
    return model, result.logits


def test_auto_resolves_by_device_and_backbone(tiny, monkeypatch):
    import lpft.training.fastpath as ft

    auto = resolve_fast_path(FinetuneConfig(), tiny, CPU)
    assert auto.autocast_dtype is None and not auto.compile and not auto.data_on_device
    assert auto.channels_last  # measured faster for EfficientNet-Lite0 training on CPU
    text = type("Text", (), {"modality": "text"})()
    monkeypatch.setattr(ft, "cpu_has_native_bf16", lambda: True)
    assert resolve_fast_path(FinetuneConfig(), text, CPU).autocast_dtype == torch.bfloat16
    assert resolve_fast_path(FinetuneConfig(), tiny, CPU).autocast_dtype is None  # CNNs stay fp32 on CPU
    monkeypatch.setattr(ft, "cpu_has_native_bf16", lambda: False)
    assert resolve_fast_path(FinetuneConfig(), text, CPU).autocast_dtype is None
    forced = resolve_fast_path(FinetuneConfig(precision="bf16", channels_last="off", compile="on"), tiny, CPU)
    assert forced.autocast_dtype == torch.bfloat16 and not forced.channels_last and forced.compile
    assert not resolve_fast_path(FinetuneConfig(channels_last="on"), text, CPU).channels_last  # images only
    with pytest.raises(ValueError, match="precision"):
        FinetuneConfig(precision="fp16")


def test_channels_last_and_fused_optimizer_do_not_change_results(tiny):
    task = small_digits_task(per_split=20)
    plain, plain_logits = _run(tiny, task, channels_last="off", fused_optimizer=False)
    fast, fast_logits = _run(tiny, task, channels_last="on", fused_optimizer=True)
    for key in plain_logits:
        np.testing.assert_allclose(fast_logits[key], plain_logits[key], rtol=1e-4, atol=1e-4)
    # the model is handed back in the layout it came in
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_bf16_autocast_trains_close_to_fp32(tiny):
    task = small_digits_task(per_split=20)
    _, fp32 = _run(tiny, task, precision="fp32")
    _, bf16 = _run(tiny, task, precision="bf16")
    assert bf16["id_test"].dtype == np.float32 and np.isfinite(bf16["id_test"]).all()
    np.testing.assert_allclose(bf16["id_test"], fp32["id_test"], atol=0.1 * np.abs(fp32["id_test"]).max())


class _FailInBackward(torch.autograd.Function):
    """Identity whose backward raises, as inductor's generated stride assertions do."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("expected size 512==512, stride 9==1 at dim=1")


def _backend_failing_in_backward(graph, example_inputs):
    """A torch.compile backend whose compiled code runs the forward and fails in the backward."""
    def run(*args):
        return [_FailInBackward.apply(out) if out.requires_grad else out for out in graph(*args)]
    return run


def test_compiled_code_failing_on_first_step_falls_back_to_eager(tiny, monkeypatch, caplog):
    """torch.compile (dynamo tracing the real model) with generated code that fails in the first
    backward, as inductor's did on an H200: the run warns, goes on eagerly, and ends exactly where
    a run without compile ends, BatchNorm running statistics included."""
    task = small_digits_task(per_split=20)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=_backend_failing_in_backward))
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="lpft.training"):
            fell_back, fell_back_logits = _run(tiny, task, compile="on", bn_mode="train")
    finally:
        torch._dynamo.reset()
    assert "torch.compile failed on the first training step (AssertionError: expected size" in caplog.text
    eager, eager_logits = _run(tiny, task, compile="off", bn_mode="train")
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(fell_back.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for key in eager_logits:
        np.testing.assert_array_equal(fell_back_logits[key], eager_logits[key])


def test_split_data_held_on_device_and_batched_inference(tiny):
    task = small_digits_task(per_split=20)
    data = SplitData(tiny, task.id_test)
    assert data.preloaded and data.nbytes == len(data) * 3 * 32 * 32 * 4 and data.device == CPU
    assert data.to(CPU).batch(torch.arange(3)).shape == (3, 3, 32, 32)
    feats = compute_features(tiny, data, CPU, batch_size=7)
    model = Classifier(tiny, task.num_classes)
    logits = predict_logits(model, data, CPU, batch_size=7, fast=resolve_fast_path(FinetuneConfig(), tiny, CPU))
    np.testing.assert_allclose(logits, feats @ model.head.weight.detach().numpy().T + model.head.bias.detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_cli_flags_reach_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    args = parser.parse_args(["--precision", "bf16", "--compile", "off", "--channels-last", "on", "--batch-size", "auto"])
    config = FinetuneConfig(**method_settings(args, "ft"))
    assert (config.precision, config.compile, config.channels_last, config.batch_size) == ("bf16", "off", "on", "auto")
    assert config.resolve(300).batch_size == 30
    with pytest.raises(ConfigError, match="--batch-size, --channels-last, --compile, --precision do not apply to --method lp"):
        method_settings(args, "lp")
