"""The Method contract and registry: a method is one small class with its own config, registered by name.

A method is registered as ``(name, config dataclass, method class)``, as PEFT registers its
tuners: the class names its :class:`~lpft.config.MethodConfig` subclass in ``config_class``,
and the config's declared settings become ``lpft run`` flags, sweep-spec keys and recorded
hyperparameters without any other module naming the method. See docs/extending.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lpft.backbones.base import Backbone
from lpft.config import MethodConfig
from lpft.data.task import Task
from lpft.errors import ConfigError
from lpft.registry import Registry, load_plugins
from lpft.training import Classifier


@dataclass
class MethodResult:
    """What a method hands to evaluation: logits on every evaluated split, and what it chose.

    ``selected`` holds the choices made on ID validation (e.g. ``C`` or ``epoch``);
    ``history`` per-epoch (or per-C) records; ``model`` the network that makes the logits
    (backbone and head), saved with the run so it can be reused; ``tuned_backbone`` says
    whether its backbone differs from the pretrained one (if not, only the head is saved);
    ``diagnostics`` what the method measured on the way (e.g. the first training step).
    """

    logits: dict[str, np.ndarray]
    selected: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    model: Classifier | None = None
    tuned_backbone: bool = True
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """Adapts a pretrained backbone to a task with the settings in ``self.config``.

    Must train only on ``task.train``, choose only on ``task.id_val`` and never modify the
    backbone it is given.
    """

    name: ClassVar[str]
    label: ClassVar[str]  # how tables and legends name the method
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ConfigError(f"method {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        """Train on ``task.train``, select on ``task.id_val``; return logits for every eval split."""


_METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str, label: str | None = None) -> Callable[[type[Method]], type[Method]]:
    """Register a method class under ``name``; its ``config_class`` comes with it."""

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.label = label or name.upper()
        return _METHODS.register(name)(cls)

    return wrap


def method_names(registered_order: bool = False) -> list[str]:
    """Registered method names, sorted or in registration order (LP, FT, LP-FT, then later ones)."""
    _import_builtin()
    return _METHODS.names(registered_order)


def method_class(name: str) -> type[Method]:
    """The registered class of ``name``; an unknown name lists the known ones."""
    _import_builtin()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {_METHODS.names()}")
    return _METHODS[name]


def method_config(name: str, values: Mapping[str, Any] | None = None, where: str = "") -> MethodConfig:
    """The config of method ``name`` with ``values`` set and every other setting at its default."""
    return method_class(name).config_class.from_mapping(values or {}, where or f"method {name!r}")


def create_method(name: str, config: MethodConfig | Mapping[str, Any] | None = None) -> Method:
    """An instance of method ``name``, configured by a config object or a ``{setting: value}`` mapping."""
    cls = method_class(name)
    if config is None or isinstance(config, Mapping):
        config = method_config(name, config)
    return cls(config)


# Results made after training from other runs' weights (lpft.results.soup), not registered
# methods: they have no fit of their own, only a name in the results and a label in reports.
POST_HOC_LABELS: dict[str, str] = {"uniform-soup": "Uniform soup", "greedy-soup": "Greedy soup"}


def method_label(name: str) -> str:
    """The display label of a registered or post-hoc method (its name, upper-cased, for an unknown one)."""
    _import_builtin()
    if name in _METHODS:
        return _METHODS[name].label
    return POST_HOC_LABELS.get(name, name.upper())


def _import_builtin() -> None:
    import lpft.methods.builtin  # noqa: F401  (registers lp, ft, lpft)

    load_plugins("lpft.methods")
