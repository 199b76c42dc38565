"""One run pipeline: task + backbone + method config -> fit -> evaluate -> one RunRecord -> optional save.

``lpft run``, every sweep trial and the runs ``lpft diagnose`` reads go through
:func:`execute`. A :class:`RunSpec` says what to run as plain JSON data (a sweep trial is
one, hashed); the task and backbone are built once per process and reused by later runs
(methods never modify the backbone they are given).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lpft.backbones import Backbone, create_backbone
from lpft.config import MethodConfig
from lpft.data import Task, load_task
from lpft.data.loader import current_loading, loading
from lpft.errors import BackboneError, ConfigError
from lpft.evaluation import evaluate
from lpft.methods import Method, MethodResult, create_method, method_config
from lpft.paths import cache_dir
from lpft.runs.artifacts import check_save_target, save_run
from lpft.runs.record import RunRecord, environment
from lpft.training.checkpoint import checkpointing
from lpft.training.distributed import local_device

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; under torchrun each process takes its local GPU."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu (or auto)")
    return local_device(dev)


def canonical(value: Any) -> str:
    """Canonical JSON: equal data, equal text (hashes and cache keys)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class RunSpec:
    """What to run, as plain JSON data: enough to repeat the run anywhere.

    ``task`` is a bundled benchmark name or a task YAML path; ``hyperparameters`` are the
    method's settings (missing ones take the config's defaults).
    """

    task: str
    backbone: str
    method: str
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    task_options: Mapping[str, Any] = field(default_factory=dict)
    backbone_options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "task_options": dict(self.task_options), "backbone": self.backbone,
                "backbone_options": dict(self.backbone_options), "method": self.method,
                "hyperparameters": dict(self.hyperparameters)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(data["task"], data["backbone"], data["method"], data.get("hyperparameters", {}),
                   data.get("task_options", {}), data.get("backbone_options", {}))

    def config(self) -> MethodConfig:
        """The method's config with these settings (unresolved ``"auto"`` values kept)."""
        return method_config(self.method, self.hyperparameters)


@functools.lru_cache(maxsize=2)
def _task(spec: str, options_json: str) -> Task:
    return load_task(spec, **json.loads(options_json))


@functools.lru_cache(maxsize=2)
def _backbone(name: str, options_json: str) -> Backbone:
    return create_backbone(name, **json.loads(options_json))


def load_task_once(spec: str, options: Mapping[str, Any] | None = None) -> Task:
    """A task by benchmark name or YAML path, loaded once per process (benchmarks read their cache on load)."""
    return _task(spec, canonical(dict(options or {})))


def create_backbone_once(name: str, options: Mapping[str, Any] | None = None) -> Backbone:
    """A backbone, built once per process for the same options."""
    return _backbone(name, canonical({k: v for k, v in (options or {}).items() if v is not None}))


def check_cache_writable() -> None:
    """Fail before any work when the feature cache cannot be written (the result would be lost after extraction)."""
    folder = cache_dir()
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"the cache folder {folder} is not writable; point LPFT_CACHE at a writable folder")


def check_modality(task: Task, backbone: Backbone) -> None:
    if backbone.modality != task.modality:
        raise BackboneError(f"backbone {backbone.name!r} reads {backbone.modality} but task {task.name!r} is a "
                            f"{task.modality} task; choose a {task.modality} backbone")


def run_method(task: Task, backbone: Backbone, method: Method, device: torch.device) -> tuple[RunRecord, MethodResult]:
    """Fit ``method`` on ``task`` and evaluate it on every split; the record and the method's own result."""
    torch.manual_seed(method.config.seed)
    env = environment(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = method.fit(task, backbone, device)
    # the method's cost: wall, and CPU time of this process (every thread; loader workers are other processes)
    timings = {"fit_seconds": round(time.perf_counter() - start, 3), "cpu_seconds": round(time.process_time() - cpu_start, 3)}
    metrics = evaluate(task, result.logits)
    record = RunRecord(
        task=task.name, backbone=backbone.name, method=method.name, hyperparameters=method.config.to_dict(),
        selected=result.selected, metrics=metrics, history=result.history, timings=timings, environment=env,
        diagnostics={**result.diagnostics, "weight_change": backbone_weight_change(backbone, result)},
    )
    log.info("%s on %s: %s", method.name, task.name, "  ".join(f"{k} {v['accuracy']:.4f}" for k, v in metrics.items()))
    return record, result


def backbone_weight_change(pretrained: Backbone, result: MethodResult) -> float:
    """How far the method moved the backbone: ``||w - w0|| / ||w0||`` over all its weights (0 when frozen)."""
    if result.model is None or not result.tuned_backbone:
        return 0.0
    from lpft.diagnostics.measure import weight_change  # the diagnostics package imports the run pipeline

    return round(weight_change(pretrained, result.model.backbone)["total"], 6)


def run_identity(spec: RunSpec, config: MethodConfig, backbone: Backbone, task: Task) -> dict[str, Any]:
    """What makes two runs the same run, so a checkpoint is resumed only by its own run.

    The spec with every setting resolved, the backbone's weights and preprocessing, and the
    sizes of the task's splits (a task built in memory is otherwise known only by its name).
    """
    return {**spec.to_json(), "hyperparameters": config.to_dict(),
            "backbone_options": {k: v for k, v in spec.backbone_options.items() if v is not None},
            "backbone_fingerprint": backbone.fingerprint, "split_sizes": {k: len(s) for k, s in task.splits()}}


def execute(
    spec: RunSpec, device: str | torch.device = "auto", save: Path | str | None = None, task: Task | None = None,
    overwrite: bool = False, checkpoint: Path | str | None = None,
) -> RunRecord:
    """Run ``spec``: load (or reuse) its task and backbone, fit, evaluate, and optionally save for diagnosis.

    ``task`` overrides loading (a task built in memory); ``save`` writes the run directory
    that ``lpft diagnose`` and reuse read (:func:`lpft.runs.artifacts.save_run`), checked
    writable before any work; a folder holding something is replaced only with ``overwrite``.
    ``checkpoint`` is a folder where the training loop saves its state after every epoch
    and from which running the same spec again resumes (:mod:`lpft.training.checkpoint`);
    the checkpoint is kept after the run. Images are read as the caller's
    :func:`lpft.data.loader.loading` says; training images skipped as unreadable are listed
    in ``record.diagnostics["skipped_images"]``.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    if save is not None:
        check_save_target(save, overwrite)
    check_cache_writable()
    config = spec.config()  # checked before anything is loaded
    in_memory = task is not None
    task = task if in_memory else load_task_once(spec.task, spec.task_options)
    backbone = create_backbone_once(spec.backbone, spec.backbone_options)
    check_modality(task, backbone)
    loaded = time.perf_counter()
    method = create_method(spec.method, config.resolve(len(task.train)))
    ambient = current_loading()  # workers, decoding and the bad-image policy, as the caller set them (lpft run --workers)
    with (contextlib.nullcontext() if checkpoint is None
          else checkpointing(checkpoint, run_identity(spec, method.config, backbone, task))), \
            loading(ambient.workers, ambient.skip_bad_images, ambient.decode, dev) as reading:  # decoded where it runs
        record, result = run_method(task, backbone, method, dev)
    if reading.skipped:
        record.diagnostics["skipped_images"] = reading.skipped
    record.backbone_options = {k: v for k, v in spec.backbone_options.items() if v is not None}
    record.spec = {**spec.to_json(), "hyperparameters": record.hyperparameters, "backbone_options": record.backbone_options}
    record.timings.update(load_seconds=round(loaded - start, 3), run_seconds=round(time.perf_counter() - start, 3))
    if save is not None:
        save_run(save, record, result, backbone, task.classes, None if in_memory else spec, overwrite)
    return record


def run(
    task: str | Task,
    backbone: str,
    method: str,
    config: MethodConfig | Mapping[str, Any] | None = None,
    device: str = "auto",
    backbone_options: Mapping[str, Any] | None = None,
    task_options: Mapping[str, Any] | None = None,
    save: Path | str | None = None,
    overwrite: bool = False,
    checkpoint: Path | str | None = None,
) -> RunRecord:
    """Run one method on one task: the Python face of ``lpft run``.

    ``task`` is a benchmark name, a task YAML path or a :class:`~lpft.data.Task`;
    ``config`` a method config or a ``{setting: value}`` mapping (defaults otherwise);
    ``checkpoint`` a folder that makes the run resumable (:func:`execute`).
    """
    values = config.to_dict() if isinstance(config, MethodConfig) else dict(config or {})
    name = task.name if isinstance(task, Task) else str(task)
    spec = RunSpec(name, backbone, method, values, task_options or {}, backbone_options or {})
    return execute(spec, device, save, task if isinstance(task, Task) else None, overwrite, checkpoint)
