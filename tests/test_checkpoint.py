"""Checkpoints (--checkpoint DIR): every piece of loop state round-trips, and a run killed mid-way
and resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lpft.backbones import create_backbone
from lpft.cli import build_parser
from lpft.errors import RunError
from lpft.methods.finetuning import FineTuning
from lpft.methods.spd import AdamWSPD
from lpft.results.spec import parse_spec
from lpft.results.sweep import expand, run_sweep
from lpft.runs import run
from lpft.training import checkpoint
from lpft.training.checkpoint import CHECKPOINT_FILE, METADATA_KEY, Progress, checkpointing

from conftest import small_digits_task, write_png_task

TESTS = Path(__file__).resolve().parent
CPU = torch.device("cpu")
SETTINGS = {"epochs": 3, "lr": 0.05, "batch_size": 16, "seed": 0}  # 40 training rows: 3 steps per epoch
KILL_AT = 4  # the second step of epoch 2


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Random timm:test_resnet weights in a file, so that every process starts from the same backbone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = create_backbone("timm:test_resnet", weights="random", image_size=32).net
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _run(weights: str, checkpoint_dir: Path | None, out: Path | None = None, **settings):
    return run(small_digits_task(per_split=20), "timm:test_resnet", "ft", {**SETTINGS, **settings}, "cpu",
               backbone_options={"weights": weights, "image_size": 32}, save=out, checkpoint=checkpoint_dir)


def _saved_epoch(folder: Path) -> int:
    with safe_open(str(folder / CHECKPOINT_FILE), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])["epoch"]


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(cache, weights, tmp_path, caplog, monkeypatch):
    ckpt = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os, signal, sys
        import torch
        sys.path.insert(0, {str(TESTS)!r})
        torch.set_num_threads(2)  # as conftest does for this process
        from conftest import small_digits_task
        from lpft.methods.finetuning import FineTuning
        from lpft.runs import run

        def kill(step, model):
            if step == {KILL_AT}:
                os.kill(os.getpid(), signal.SIGKILL)

        FineTuning.before_step = staticmethod(kill)
        run(small_digits_task(per_split=20), "timm:test_resnet", "ft", {SETTINGS!r}, "cpu",
            backbone_options={{"weights": {weights!r}, "image_size": 32}}, checkpoint={str(ckpt)!r})
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _saved_epoch(ckpt) == 1

    with caplog.at_level(logging.INFO, logger="lpft.training.checkpoint"):
        resumed = _run(weights, ckpt, tmp_path / "resumed")
    assert f"resuming from {ckpt} at epoch 1 of 3" in caplog.text
    assert _saved_epoch(ckpt) == 3  # kept after the run
    whole = _run(weights, None, tmp_path / "whole")

    assert resumed.history == whole.history and len(whole.history) == 4
    assert resumed.selected == whole.selected and resumed.metrics == whole.metrics
    for name in ("logits.safetensors", "model.safetensors"):
        got, want = load_file(str(tmp_path / "resumed" / name)), load_file(str(tmp_path / "whole" / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name

    # a finished run's checkpoint: nothing left to train, the same result again
    def must_not_train(step, model):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(FineTuning, "before_step", staticmethod(must_not_train))
    again = _run(weights, ckpt, tmp_path / "again")
    assert again.history == whole.history and again.metrics == whole.metrics
    assert torch.equal(load_file(str(tmp_path / "again" / "logits.safetensors"))["id_test"],
                       load_file(str(tmp_path / "whole" / "logits.safetensors"))["id_test"])


def test_a_checkpoint_of_another_run_is_refused(cache, weights, tmp_path):
    ckpt = tmp_path / "ckpt"
    _run(weights, ckpt, epochs=1)
    with pytest.raises(RunError, match=rf"{ckpt} holds the checkpoint of another run \(hyperparameters.lr: 0.05 "
                                        rf"there, 0.1 here\); use another --checkpoint folder .* or delete {ckpt}"):
        _run(weights, ckpt, epochs=1, lr=0.1)
    assert _saved_epoch(ckpt) == 1  # untouched


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(
        memory_format=torch.channels_last)


def _optimizer(kind: str, net: nn.Module) -> torch.optim.Optimizer:
    params = list(net.parameters())
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    return AdamWSPD([{"params": params[:2], "anchors": [p.detach().clone() for p in params[:2]]},
                     {"params": params[2:]}], lr=0.1)


def _loop_objects(kind: str):
    net = _net()
    optimizer = _optimizer(kind, net)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    return net, optimizer, schedule, torch.Generator().manual_seed(0)


def _train_step(net: nn.Module, optimizer: torch.optim.Optimizer, schedule, generator: torch.Generator) -> None:
    x = torch.randn(8, 3, 6, 6, generator=generator).to(memory_format=torch.channels_last)
    optimizer.zero_grad()
    nn.functional.cross_entropy(nn.functional.dropout(net(x), 0.5), torch.arange(8) % 3).backward()
    optimizer.step()
    schedule.step()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["sgd", "adamw", "spd"])
def test_every_piece_of_loop_state_round_trips(tmp_path, kind):
    net, optimizer, schedule, generator = _loop_objects(kind)
    for _ in range(3):
        _train_step(net, optimizer, schedule, generator)
    progress = Progress(epoch=1, step=3, history=[{"epoch": 0, "train_loss": None, "accuracy": {"id_val": 0.5}}],
                        best_epoch=0, best_accuracy=0.5, best_state={k: v.clone() for k, v in net.state_dict().items()},
                        logits={"id_val": np.arange(6, dtype=np.float32).reshape(2, 3)},
                        loss_limit=torch.tensor(110.0), first_bad=torch.tensor(-1), bad_loss=torch.tensor(0.0))
    run_id = {"method": "ft", "hyperparameters": {"lr": 0.1}}
    with checkpointing(tmp_path, run_id):
        checkpoint.save(progress, net, optimizer, schedule, generator, CPU)
    rng = torch.get_rng_state()

    torch.manual_seed(123)  # the global RNG moves on; resuming puts it back
    fresh = _loop_objects(kind)
    with checkpointing(tmp_path, run_id):
        loaded = checkpoint.resume(*fresh, CPU, epochs=3)
    assert loaded is not None
    assert _equal(loaded.__dict__, progress.__dict__)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(fresh[3].get_state(), generator.get_state())
    assert _equal(fresh[0].state_dict(), net.state_dict())
    assert _equal(fresh[1].state_dict(), optimizer.state_dict())  # momentum / moments, step, param groups, anchors
    assert _equal(fresh[2].state_dict(), schedule.state_dict())
    conv = fresh[0][0].weight
    state = fresh[1].state[conv]
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in state.values() if v.shape == conv.shape)

    # and both continue identically (dropout draws from the global RNG: both from the restored state)
    _train_step(net, optimizer, schedule, generator)
    torch.set_rng_state(rng)
    _train_step(*fresh)
    assert _equal(fresh[0].state_dict(), net.state_dict())


def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path):
    net, optimizer, schedule, generator = _loop_objects("sgd")
    progress = Progress(0, 0, [], 0, 0.0, net.state_dict(), {}, None, torch.tensor(-1), torch.tensor(0.0))
    with checkpointing(tmp_path, {"run": 1}):
        checkpoint.save(progress, net, optimizer, schedule, generator, CPU)
        assert checkpoint.resume(*_loop_objects("sgd"), CPU, epochs=1) is not None
    file = tmp_path / CHECKPOINT_FILE
    file.write_bytes(file.read_bytes()[:-100])  # truncated
    with (pytest.raises(RunError, match=rf"{file} is damaged .*delete it to start the run over"),
          checkpointing(tmp_path, {"run": 1})):
        pass
    assert not any(tmp_path.glob(".*.tmp"))


def test_without_checkpointing_the_loop_saves_and_resumes_nothing(tmp_path):
    net, optimizer, schedule, generator = _loop_objects("sgd")
    progress = Progress(1, 3, [], 0, 0.0, net.state_dict(), {}, None, torch.tensor(-1), torch.tensor(0.0))
    checkpoint.save(progress, net, optimizer, schedule, generator, CPU)
    assert checkpoint.resume(net, optimizer, schedule, generator, CPU, epochs=1) is None
    assert not os.listdir(tmp_path)


def test_a_sweep_checkpoints_each_trial_in_its_own_folder_and_removes_it_once_stored(cache, weights, tmp_path,
                                                                                     monkeypatch):
    spec = parse_spec({"name": "ckpt", "task": str(write_png_task(tmp_path / "task")), "backbone": "timm:test_resnet",
                       "backbone_options": {"weights": weights, "image_size": 32}, "seeds": [0],
                       "methods": {"ft": {"epochs": 2, "lr": 0.05, "batch_size": 16}}})
    (trial,) = expand(spec)
    ckpt = tmp_path / "ckpt"
    seen = []
    monkeypatch.setattr(FineTuning, "before_step",
                        staticmethod(lambda step, model: seen.append((ckpt / trial.hash / CHECKPOINT_FILE).is_file())))
    summary = run_sweep(spec, tmp_path / "r.sqlite", "cpu", progress=False, checkpoint=ckpt)
    assert (summary.finished, summary.failed) == (1, 0)
    assert seen == [False] * 3 + [True] * 3  # epoch 1 ran before the first save, epoch 2 after it
    assert not (ckpt / trial.hash).exists()


def test_the_checkpoint_flags_reach_the_commands():
    parser = build_parser()
    run_args = parser.parse_args(["run", "t", "--backbone", "b", "--method", "ft", "--checkpoint", "d"])
    assert run_args.checkpoint == Path("d")
    assert parser.parse_args(["sweep", "spec.yaml", "--checkpoint", "d"]).checkpoint == Path("d")
