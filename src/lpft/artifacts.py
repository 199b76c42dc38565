"""Save a run so it can be diagnosed later, and load it back without unpickling anything.

A run directory holds:

- ``run.json``: the run record (metrics with calibration, hyperparameters, history), how to
  rebuild the task (bundled benchmark name or YAML path, with options) and the pretrained
  backbone (registry name, options, fingerprint), and the first-step statistics;
- ``model.safetensors``: the tuned network's state dict (``backbone.*`` and ``head.*``),
  absent for methods that keep the backbone frozen (LP);
- ``logits.safetensors``: the run's logits on every evaluated split.

The pretrained backbone is never stored: it is re-created from the registry and checked
against the recorded fingerprint, so a diagnosis cannot silently compare against other weights.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from lpft.backbones import Backbone, create_backbone
from lpft.data import Task, load_task
from lpft.experiment import RunRecord
from lpft.finetune import Classifier
from lpft.methods import MethodResult

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
LOGITS_FILE = "logits.safetensors"


@dataclass
class RunArtifacts:
    """A saved run as loaded from disk (weights stay on disk until :func:`load_run_models`)."""

    path: Path
    record: RunRecord
    task: dict[str, Any]
    backbone: dict[str, Any]
    first_step: dict[str, float] | None
    logits: dict[str, np.ndarray]

    @property
    def has_weights(self) -> bool:
        return (self.path / WEIGHTS_FILE).is_file()


def save_run(
    out_dir: Path | str,
    record: RunRecord,
    result: MethodResult,
    backbone: Backbone,
    backbone_options: dict[str, Any] | None = None,
    task_spec: str | Path | None = None,
    task_options: dict[str, Any] | None = None,
    first_step: dict[str, float] | None = None,
) -> Path:
    """Write ``run.json``, ``logits.safetensors`` and (when tuned) ``model.safetensors`` to ``out_dir``.

    ``backbone`` is the *pretrained* backbone the run started from and ``backbone_options``
    the options it was created with, so :func:`load_run_models` can rebuild it. ``task_spec``
    is a bundled benchmark name or a task YAML path (made absolute); without it the task
    must be passed to the diagnosis by hand.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = task_spec
    if spec is not None and Path(spec).suffix in {".yaml", ".yml"}:
        spec = str(Path(spec).resolve())
    meta = {
        "format": FORMAT_VERSION,
        "record": record.to_json(),
        "task": {"spec": None if spec is None else str(spec), "options": task_options or {}},
        "backbone": {
            "name": record.backbone,
            "options": {k: v for k, v in (backbone_options or {}).items() if v is not None},
            "fingerprint": backbone.fingerprint,
        },
        "first_step": first_step,
    }
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2))
    save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in result.logits.items()}, str(out / LOGITS_FILE))
    if result.model is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        save_torch(state, str(out / WEIGHTS_FILE))
    log.info("saved run artifacts to %s", out)
    return out


def load_run(path: Path | str) -> RunArtifacts:
    """Read ``run.json`` and the logits of a run directory (JSON and safetensors only)."""
    path = Path(path)
    meta_path = path / RUN_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved run: no {RUN_FILE} (save one with `lpft run ... --save DIR`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this lpft reads format {FORMAT_VERSION}")
    return RunArtifacts(
        path=path,
        record=RunRecord(**meta["record"]),
        task=meta["task"],
        backbone=meta["backbone"],
        first_step=meta["first_step"],
        logits=load_numpy(str(path / LOGITS_FILE)),
    )


def load_run_task(run: RunArtifacts) -> Task:
    """Rebuild the run's task from the recorded benchmark name or YAML path and options."""
    if run.task["spec"] is None:
        raise ValueError(f"{run.path}: the run's task was built in memory; pass the Task to the diagnosis")
    task = load_task(run.task["spec"], **run.task["options"])
    if task.name != run.record.task:
        raise ValueError(f"{run.path}: rebuilt task is {task.name!r} but the run was on {run.record.task!r}")
    return task


def load_run_models(run: RunArtifacts, num_classes: int) -> tuple[Backbone, Classifier | None]:
    """The pretrained backbone (from the registry) and the tuned classifier (``None`` for LP).

    Raises when the re-created backbone's fingerprint differs from the recorded one (other
    weights or preprocessing) or when the saved weights do not fit it exactly.
    """
    pretrained = create_backbone(run.backbone["name"], **run.backbone["options"])
    if pretrained.fingerprint != run.backbone["fingerprint"]:
        raise ValueError(
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
