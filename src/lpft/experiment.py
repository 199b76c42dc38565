"""One run = task + backbone + method + hyperparameters -> metrics on every split, as JSON."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import lpft
from lpft.backbones import Backbone, create_backbone
from lpft.data import Task, load_task
from lpft.distributed import local_device
from lpft.evaluation import evaluate
from lpft.finetune import FinetuneConfig
from lpft.methods import MethodResult, create_method

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; under torchrun each process takes its local GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return local_device(torch.device(device))


@dataclass
class RunRecord:
    """The outcome of one run, in the shape written by ``lpft run --json``."""

    task: str
    backbone: str
    method: str
    hyperparameters: dict[str, Any]
    selected: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def run_method(
    task: Task, backbone: Backbone, method: str, config: FinetuneConfig, device: torch.device
) -> tuple[RunRecord, MethodResult]:
    """Fit ``method`` and evaluate it on every split of ``task``."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    fitter = create_method(method)
    result = fitter.fit(task, backbone, config, device)
    fit_seconds = time.perf_counter() - start
    metrics = evaluate(task, result.logits)
    hyperparameters = fitter.hyperparameters(config)
    record = RunRecord(
        task=task.name,
        backbone=backbone.name,
        method=method,
        hyperparameters={**hyperparameters, "device": str(device)},
        selected=result.selected,
        metrics=metrics,
        history=result.history,
        timings={"fit_seconds": round(fit_seconds, 3)},
        environment={"lpft": lpft.__version__, "torch": torch.__version__, "python": platform.python_version()},
    )
    log.info("%s on %s: %s", method, task.name, {k: round(v["accuracy"], 4) for k, v in metrics.items()})
    return record, result


def run(
    task: str | Task,
    backbone: str,
    method: str,
    config: FinetuneConfig | None = None,
    device: str = "auto",
    backbone_options: dict[str, Any] | None = None,
) -> RunRecord:
    """Load the task and backbone by name, then :func:`run_method`."""
    task = load_task(task) if isinstance(task, str) else task
    bb = create_backbone(backbone, **(backbone_options or {}))
    if bb.modality != task.modality:
        raise ValueError(f"backbone {backbone!r} reads {bb.modality} but task {task.name!r} is a {task.modality} task")
    record, _ = run_method(task, bb, method, config or FinetuneConfig(), resolve_device(device))
    return record
