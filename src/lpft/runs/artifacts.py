"""Save a run so it can be diagnosed and reused later, and load it back without unpickling anything.

A run directory holds:

- ``run.json``: the run record (metrics with calibration, hyperparameters, history, what the
  method measured on the way), how to rebuild the task (bundled benchmark name or YAML
  path, with options) and the pretrained backbone (registry name, options, fingerprint);
- ``model.safetensors``: the tuned network's state dict (``backbone.*`` and ``head.*``),
  absent for methods that keep the backbone frozen (LP);
- ``head.safetensors``: the linear head (``weight``, ``bias``), for every method that has
  one, so :func:`load_model` can rebuild the classifier (``lpft predict``);
- ``logits.safetensors``: the run's logits on every evaluated split.

The pretrained backbone is never stored: it is re-created from the registry and checked
against the recorded fingerprint, so a diagnosis cannot silently compare against other weights.
A run is written to a fresh folder beside the target and moved into place, so no file of an
earlier run survives next to a new one and an interrupted save leaves no half-written run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from lpft.backbones import Backbone, create_backbone
from lpft.data import Task, load_task
from lpft.errors import RunError
from lpft.methods import MethodResult
from lpft.runs.record import RunRecord
from lpft.training import Classifier

if TYPE_CHECKING:
    from lpft.runs.pipeline import RunSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"
LOGITS_FILE = "logits.safetensors"


@dataclass
class RunArtifacts:
    """A saved run as loaded from disk (weights stay on disk until :func:`load_run_models`)."""

    path: Path
    record: RunRecord
    task: dict[str, Any]
    backbone: dict[str, Any]
    logits: dict[str, np.ndarray]

    @property
    def has_weights(self) -> bool:
        return (self.path / WEIGHTS_FILE).is_file()

    @property
    def first_step(self) -> dict[str, float] | None:
        return self.record.diagnostics.get("first_step")


def check_save_target(out_dir: Path | str, overwrite: bool = False) -> Path:
    """Check before any work that ``out_dir`` can receive a run: refuse a folder that holds
    something (another run, or anything else) unless ``overwrite``, and a parent we cannot write."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        what = "a saved run" if (out / RUN_FILE).is_file() else "other files"
        raise RunError(f"{out} already holds {what}; choose a new folder or pass --overwrite to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot write a run into {out} (--out): cannot create {parent}: {exc.strerror}; "
                       "choose another folder") from exc
    if not os.access(parent, os.W_OK):
        raise RunError(f"cannot write a run into {out}: {parent} is not writable")
    return out


def save_run(
    out_dir: Path | str, record: RunRecord, result: MethodResult, backbone: Backbone, classes: Sequence[str],
    spec: RunSpec | None = None, overwrite: bool = False,
) -> Path:
    """Write ``run.json``, ``logits.safetensors`` and (when tuned) ``model.safetensors`` as ``out_dir``.

    ``backbone`` is the *pretrained* backbone the run started from; ``spec`` says how the
    task was built, so :func:`load_run_task` can rebuild it (without it, e.g. for a task
    built in memory, the task must be passed to the diagnosis by hand). An existing ``out_dir`` is replaced only with ``overwrite``.
    """
    out = check_save_target(out_dir, overwrite)
    task_spec = None if spec is None else spec.task
    if task_spec is not None and Path(task_spec).suffix in {".yaml", ".yml"}:
        task_spec = str(Path(task_spec).resolve())
    meta = {
        "format": FORMAT_VERSION,
        "record": record.to_json(),
        "task": {"spec": task_spec, "options": dict(spec.task_options) if spec else {}, "classes": list(classes)},
        "backbone": {"name": record.backbone, "options": record.backbone_options, "fingerprint": backbone.fingerprint},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        (staging / RUN_FILE).write_text(json.dumps(meta, indent=2))
        save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in result.logits.items()},
                   str(staging / LOGITS_FILE))
        if result.model is not None:
            head = {k: v.detach().cpu().contiguous() for k, v in result.model.head.state_dict().items()}
            save_torch(head, str(staging / HEAD_FILE))
        if result.model is not None and result.tuned_backbone:
            state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
            save_torch(state, str(staging / WEIGHTS_FILE))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("saved the run to %s", out)
    return out


def load_run(path: Path | str) -> RunArtifacts:
    """Read ``run.json`` and the logits of a run directory (JSON and safetensors only)."""
    path = Path(path)
    meta_path = path / RUN_FILE
    if not meta_path.is_file():
        raise RunError(f"{path} is not a saved run: no {RUN_FILE} (save one with `lpft run ... --out DIR`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{meta_path} is not valid JSON ({exc}); save the run again with `lpft run ... --out DIR`") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise RunError(f"{meta_path}: format {found!r}, this lpft reads format {FORMAT_VERSION}")
    record = RunRecord.from_json(meta["record"])
    if meta.get("first_step") and "first_step" not in record.diagnostics:  # runs saved before records carried it
        record.diagnostics["first_step"] = meta["first_step"]
    if not record.backbone_options:
        record.backbone_options = meta["backbone"].get("options", {})
    return RunArtifacts(path=path, record=record, task=meta["task"], backbone=meta["backbone"],
                        logits=load_numpy(str(path / LOGITS_FILE)))


def load_run_task(run: RunArtifacts) -> Task:
    """Rebuild the run's task from the recorded benchmark name or YAML path and options."""
    if run.task["spec"] is None:
        raise RunError(f"{run.path}: the run's task was built in memory; pass the Task to the diagnosis")
    task = load_task(run.task["spec"], **run.task["options"])
    if task.name != run.record.task:
        raise RunError(f"{run.path}: rebuilt task is {task.name!r} but the run was on {run.record.task!r}")
    return task


def load_run_models(run: RunArtifacts, num_classes: int) -> tuple[Backbone, Classifier | None]:
    """The pretrained backbone (from the registry) and the tuned classifier (``None`` for LP).

    Raises when the re-created backbone's fingerprint differs from the recorded one (other
    weights or preprocessing) or when the saved weights do not fit it exactly.
    """
    pretrained = create_backbone(run.backbone["name"], **run.backbone["options"])
    if pretrained.fingerprint != run.backbone["fingerprint"]:
        raise RunError(
            f"{run.path}: backbone {run.backbone['name']!r} with options {run.backbone['options']} now has fingerprint "
            f"{pretrained.fingerprint!r}, the run started from {run.backbone['fingerprint']!r}: different weights or preprocessing"
        )
    pretrained.eval()
    if not run.has_weights:
        return pretrained, None
    tuned = Classifier(copy.deepcopy(pretrained), num_classes)
    tuned.load_state_dict(load_torch(str(run.path / WEIGHTS_FILE)), strict=True)
    tuned.eval()
    return pretrained, tuned


def load_model(path: Path | str) -> tuple[Classifier, tuple[str, ...]]:
    """The classifier a saved run ended with (backbone and head, in eval mode) and its class names.

    The pretrained backbone is rebuilt from the registry and checked against the recorded
    fingerprint; tuned weights replace it where the method tuned it. Use it as
    ``model(backbone.preprocess(inputs))`` or through ``lpft predict``.
    """
    run = load_run(path)
    classes = run.task.get("classes")
    if not classes or not (run.path / HEAD_FILE).is_file():
        raise RunError(f"{run.path} holds no reusable model (saved by an older lpft, or its method has no head); "
                       "run it again with `lpft run ... --out DIR`")
    pretrained, tuned = load_run_models(run, len(classes))
    if tuned is None:
        tuned = Classifier(pretrained, len(classes))
        tuned.head.load_state_dict(load_torch(str(run.path / HEAD_FILE)), strict=True)
    return tuned.eval(), tuple(classes)
