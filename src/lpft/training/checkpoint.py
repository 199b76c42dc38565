"""Checkpoints of the training loop, so that a long run survives interruption.

:func:`lpft.runs.execute` (``lpft run ... --checkpoint DIR``) wraps a run in
:func:`checkpointing`; inside it, :func:`lpft.training.finetune` saves its whole state at the
end of every epoch (:func:`save`) and, when ``DIR`` already holds a checkpoint of the same run,
continues after the saved epoch (:func:`resume`). The resumed run ends with the same selected
epoch, history and logits as an uninterrupted one (bit for bit on CPU): the model, optimiser
and LR schedule, the permutation generator and torch's global RNG (CUDA's too on a GPU), the
step, the divergence check's state, the history and the best epoch's weights and logits are
all restored. The data path keeps no random state of its own to save: augmentation draws
from the seed, epoch and example alone.

Everything lives in one file, ``DIR/checkpoint.safetensors``: the tensors as safetensors and
everything else (epoch, step, history, optimiser param groups, schedule, the run's identity)
as JSON in its metadata, so that one rename replaces tensors and state together. The file is
written beside its predecessor, flushed to disk and renamed over it: a kill during a save
leaves the previous checkpoint intact. Loading unpickles nothing (safetensors and ``json``).

A checkpoint belongs to one run: it stores the sha256 of the run's canonical JSON (what
:func:`checkpointing` is given), and a checkpoint of any other run is refused, never mixed in.
A damaged file is an error naming it rather than a silent restart, which could throw away
days of training over a problem the user can fix. The checkpoint is kept after the run ends;
resuming a finished run trains nothing and returns the same result.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lpft.errors import RunError
from lpft.paths import atomic_target, remove_stale_temps
from lpft.training import distributed

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.safetensors"
METADATA_KEY = "lpft_checkpoint"
# JSON stand-ins for what JSON lacks: a tensor (stored under this name), a tuple, a dict with non-string keys
TENSOR, TUPLE, ITEMS = "$tensor", "$tuple", "$items"


@dataclass(frozen=True)
class Checkpoint:
    """Where one run's checkpoint lives, and the identity (JSON data) a checkpoint there must carry."""

    folder: Path
    run: Mapping[str, Any]

    @property
    def file(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def key(self) -> str:
        """sha256 of the identity's canonical JSON."""
        return hashlib.sha256(json.dumps(self.run, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Progress:
    """The loop's state at the end of an epoch besides the objects restored in place (model, optimiser, ...)."""

    epoch: int
    step: int
    history: list[dict]
    best_epoch: int
    best_accuracy: float
    best_state: dict[str, torch.Tensor]
    logits: dict[str, np.ndarray]
    loss_limit: torch.Tensor | None
    first_bad: torch.Tensor
    bad_loss: torch.Tensor


_ACTIVE: contextvars.ContextVar[Checkpoint | None] = contextvars.ContextVar("lpft_checkpoint", default=None)


@contextlib.contextmanager
def checkpointing(folder: Path | str, run: Mapping[str, Any]) -> Iterator[None]:
    """Checkpoint the training loop inside the block to ``folder``, for the run that ``run`` identifies.

    The loop reads this context because methods call it from ``Method.fit``, whose signature
    carries no folder. A checkpoint already in ``folder`` is checked on entry, so a foreign
    or damaged one fails the run before training.
    """
    active = Checkpoint(Path(folder), dict(run))
    if active.folder.exists() and not active.folder.is_dir():
        raise RunError(f"--checkpoint {active.folder} is a file; give a folder")
    if distributed.is_main_process():
        remove_stale_temps(active.folder)  # what a save killed mid-write left behind
    _read(active, tensors=False)
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
    if not active.file.is_file() and distributed.is_main_process():
        log.info("--checkpoint %s: nothing was saved (the method trains no epochs)", active.folder)


def save(progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
         schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator, device: torch.device) -> None:
    """Replace the active checkpoint with the loop's state after ``progress.epoch``.

    A no-op outside :func:`checkpointing`, and on every DDP rank but 0 (all ranks hold the same state).
    """
    active = _ACTIVE.get()
    if active is None or not distributed.is_main_process():
        return
    state = {
        "format": FORMAT_VERSION, "key": active.key, "run": active.run,
        "epoch": progress.epoch, "step": progress.step, "history": progress.history,
        "best_epoch": progress.best_epoch, "best_accuracy": progress.best_accuracy,
        "best_state": progress.best_state,
        "logits": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in progress.logits.items()},
        "divergence": {"loss_limit": progress.loss_limit, "first_bad": progress.first_bad,
                       "bad_loss": progress.bad_loss},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "rng": _rng_states(generator, device),
    }
    tensors: dict[str, torch.Tensor] = {}
    metadata = {METADATA_KEY: json.dumps(_pack(state, "", tensors))}
    with atomic_target(active.file) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename: a crashed machine keeps a whole checkpoint too


def resume(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
           generator: torch.Generator, device: torch.device, epochs: int) -> Progress | None:
    """Restore the active checkpoint into the loop's objects and return the rest of its state.

    ``None`` when there is nothing to resume (no active checkpoint, or no file yet).
    """
    active = _ACTIVE.get()
    state = None if active is None else _read(active, tensors=True)
    if active is None or state is None:
        return None
    try:
        model.load_state_dict(state["model"])
        _load_optimizer(optimizer, state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng = state["rng"]
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        divergence = state["divergence"]
        progress = Progress(
            epoch=state["epoch"], step=state["step"], history=state["history"], best_epoch=state["best_epoch"],
            best_accuracy=state["best_accuracy"], best_state=state["best_state"],
            logits={k: v.numpy() for k, v in state["logits"].items()},
            loss_limit=None if divergence["loss_limit"] is None else divergence["loss_limit"].to(device),
            first_bad=divergence["first_bad"].to(device), bad_loss=divergence["bad_loss"].to(device),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RunError(f"{active.file} does not fit this run ({exc}); delete it to start the run over") from exc
    log.info("resuming from %s at epoch %d of %d%s", active.folder, progress.epoch, epochs,
             "" if progress.epoch < epochs else ": training had finished")
    return progress


def _read(active: Checkpoint, tensors: bool) -> dict[str, Any] | None:
    """The checkpoint in ``active.folder`` (its metadata alone unless ``tensors``), checked to be this run's."""
    if not active.file.is_file():
        return None
    try:
        with safe_open(str(active.file), framework="pt") as f:
            packed = json.loads(f.metadata()[METADATA_KEY])
            stored = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        fmt, key = packed["format"], packed["key"]
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{active.file} is damaged or not an lpft checkpoint ({type(exc).__name__}: {exc}); "
                       f"delete it to start the run over") from exc
    if fmt != FORMAT_VERSION:
        raise RunError(f"{active.file}: checkpoint format {fmt!r}, this lpft reads format {FORMAT_VERSION}; "
                       "delete it to start the run over")
    if key != active.key:
        differences = _differences(packed.get("run") or {}, active.run)
        raise RunError(
            f"{active.folder} holds the checkpoint of another run ({'; '.join(differences[:3]) or 'other settings'}); "
            f"use another --checkpoint folder for this run, or delete {active.folder} to start over")
    return _unpack(packed, stored) if tensors else packed


def _rng_states(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # dropout and drop-connect draw there (under DDP: rank 0's state is saved)
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load ``saved`` into ``optimizer``, each tensor placed like the one it replaces.

    Tensors in param groups (SPD's anchors) keep their device; state tensors the memory format
    of their parameter (channels_last), as in the uninterrupted run, where the layout decides
    the order of floating-point reductions.
    """
    current = optimizer.state_dict()["param_groups"]
    groups = [{k: _like(now.get(k), v) for k, v in then.items()}
              for now, then in zip(current, saved["param_groups"], strict=True)]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in list(state.items()):
                state[name] = _like(p, value)


def _like(current: Any, saved: Any) -> Any:
    """``saved``, with each tensor of ``current``'s shape given its device, dtype and memory format."""
    if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor) and saved.shape == current.shape:
        return torch.empty_like(current).copy_(saved)
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current):
        return type(saved)(_like(c, s) for c, s in zip(current, saved))
    return saved


def _pack(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON data, its tensors moved into ``tensors`` under their path in ``value``.

    Tensors are copied to contiguous CPU tensors: safetensors refuses tensors that share memory
    (tied weights) and stores one layout.
    """
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return {TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _pack(v, _path(name, k), tensors) for k, v in value.items()}
        return {ITEMS: [[k, _pack(v, _path(name, k), tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        packed = [_pack(v, _path(name, i), tensors) for i, v in enumerate(value)]
        return {TUPLE: packed} if isinstance(value, tuple) else packed
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise RunError(f"cannot checkpoint {name}: a {type(value).__name__} is neither a tensor nor JSON data")


def _path(name: str, key: object) -> str:
    return f"{name}/{key}" if name else str(key)


def _unpack(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_pack`."""
    if isinstance(value, dict):
        if value.keys() == {TENSOR}:
            return tensors[value[TENSOR]]
        if value.keys() == {TUPLE}:
            return tuple(_unpack(v, tensors) for v in value[TUPLE])
        if value.keys() == {ITEMS}:
            return {k: _unpack(v, tensors) for k, v in value[ITEMS]}
        return {k: _unpack(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    return value


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """What differs between two run identities, as ``key: saved there, current here`` lines."""
    out = []
    for k in sorted(set(saved) | set(current)):
        there, here = saved.get(k), current.get(k)
        if isinstance(there, Mapping) and isinstance(here, Mapping):
            out += _differences(there, here, f"{prefix}{k}.")
        elif there != here:
            out.append(f"{prefix}{k}: {there!r} there, {here!r} here")
    return out
