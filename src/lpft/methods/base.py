"""The Method contract and registry: a method is one small class, registered by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lpft.backbones.base import Backbone
from lpft.data.task import Task
from lpft.finetune import Classifier, FinetuneConfig
from lpft.registry import Registry


@dataclass
class MethodResult:
    """What a method hands to evaluation: logits on every evaluated split, and what it chose.

    ``selected`` holds the choices made on ID validation (e.g. ``C`` or ``epoch``);
    ``history`` per-epoch (or per-C) records; ``model`` the tuned network when there is one.
    """

    logits: dict[str, np.ndarray]
    selected: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    model: Classifier | None = None


class Method(ABC):
    """Adapts a pretrained backbone to a task. Must not modify the backbone it is given."""

    name: ClassVar[str]

    @abstractmethod
    def fit(self, task: Task, backbone: Backbone, config: FinetuneConfig, device: torch.device) -> MethodResult:
        """Train on ``task.train``, select on ``task.id_val``; return logits for every eval split."""

    def hyperparameters(self, config: FinetuneConfig) -> dict[str, Any]:
        """The part of ``config`` this method reads, as recorded with its results."""
        return config.to_dict()


_METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        return _METHODS.register(name)(cls)

    return wrap


def method_names() -> list[str]:
    _import_builtin()
    return _METHODS.names()


def create_method(name: str) -> Method:
    _import_builtin()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {_METHODS.names()}")
    return _METHODS[name]()


def _import_builtin() -> None:
    import lpft.methods.builtin  # noqa: F401  (registers lp, ft, lpft)
