"""Method configurations whose fields describe themselves.

A method's settings are one dataclass deriving from :class:`MethodConfig`, each field
declared with :func:`setting` (its help text, allowed values, bounds, and whether ``"auto"``
is allowed). Everything else is derived from those declarations, in one place: validation
(a :class:`~lpft.errors.ConfigError` naming the field), the ``lpft run`` flags, the keys a
sweep spec accepts, and what a run records as its hyperparameters. A config class also
declares ``default_grid``: the values a sweep uses when its spec says nothing (a list is
swept, a scalar fixed), which is how each method carries its own protocol.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from lpft.errors import ConfigError

# Image preprocessing presets (an image backbone's ``augment`` option; :class:`lpft.backbones.base.ImageBackbone`).
# Here, with no heavy import, so the command line can offer them without loading torch.
AUGMENT_PRESETS: tuple[str, ...] = ("none", "paper")
# Who decodes image files (:func:`lpft.data.loader.loading`, ``--decode``): also here for the command line.
DECODE_MODES: tuple[str, ...] = ("auto", "workers", "device")

AUTO = "auto"
C = TypeVar("C", bound="MethodConfig")
AutoResolver = Callable[[int], Any]  # n_train -> the value "auto" stands for


def setting(
    default: Any,
    help: str,
    *,
    kind: type | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    auto: bool | AutoResolver = False,
) -> Any:
    """A config field with its help text and constraints.

    ``kind`` defaults to the type of ``default``; ``minimum`` and ``maximum`` are inclusive,
    ``above`` exclusive; ``auto`` allows the string ``"auto"``: ``True`` leaves it for the method to
    interpret, a callable ``f(n_train)`` is how :meth:`MethodConfig.resolve` replaces it.
    """
    meta = {"help": help, "kind": kind or type(default), "choices": choices, "minimum": minimum, "maximum": maximum,
            "above": above, "auto": auto}
    return field(default=default, metadata=meta)


def parse_bool(text: str) -> bool:
    """``true/false``, ``on/off``, ``yes/no``, ``1/0`` (as flags and YAML write them)."""
    value = str(text).strip().lower()
    if value in ("true", "on", "yes", "1"):
        return True
    if value in ("false", "off", "no", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass
class MethodConfig:
    """Settings shared by every method; subclasses add their own with :func:`setting`."""

    seed: int = setting(0, "random seed: head initialisation, batch order, subsamples", minimum=0, maximum=2**32 - 1)

    default_grid: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_value(type(self), f.name, getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name: what a run records as its hyperparameters."""
        return dataclasses.asdict(self)

    @classmethod
    def settings(cls) -> dict[str, dataclasses.Field]:
        """The declared fields, in declaration order."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_mapping(cls: type[C], values: Mapping[str, Any], where: str = "") -> C:
        """A config from ``{name: value}``; an unknown name is an error that lists the known ones."""
        unknown = sorted(set(values) - set(cls.settings()))
        if unknown:
            place = f" in {where}" if where else ""
            raise ConfigError(f"unknown setting(s) {unknown}{place}; {cls.__name__} has {sorted(cls.settings())}")
        return cls(**values)

    def resolve(self: C, n_train: int) -> C:
        """A copy with each ``"auto"`` whose setting has a resolver replaced by its value for ``n_train``."""
        changes = {}
        for name, f in self.settings().items():
            resolver = f.metadata.get("auto")
            if getattr(self, name) == AUTO and callable(resolver):
                changes[name] = resolver(n_train)
        return dataclasses.replace(self, **changes) if changes else self

    def needs_task_size(self) -> bool:
        """Whether :meth:`resolve` has an ``"auto"`` to replace."""
        return any(getattr(self, n) == AUTO and callable(f.metadata.get("auto")) for n, f in self.settings().items())


def check_value(cls: type[MethodConfig], name: str, value: Any) -> Any:
    """``value`` checked (and numbers normalised) against the declaration of ``cls.name``."""
    meta = cls.settings()[name].metadata
    where = f"{name} ({cls.__name__})"
    if value == AUTO and meta.get("auto"):
        return value
    kind = meta["kind"]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            extra = " or 'auto'" if meta.get("auto") else ""
            raise ConfigError(f"{where} must be a number{extra}, got {value!r}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ConfigError(f"{where} must be >= {meta['minimum']}, got {value!r}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise ConfigError(f"{where} must be <= {meta['maximum']}, got {value!r}")
        if meta["above"] is not None and value <= meta["above"]:
            raise ConfigError(f"{where} must be > {meta['above']}, got {value!r}")
        return value
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be a {kind.__name__}, got {value!r}")
    return value


def parse_text(cls: type[MethodConfig], name: str, text: str) -> Any:
    """A setting's value from its command-line text (``"auto"``, numbers, booleans, choices)."""
    meta = cls.settings()[name].metadata
    if text == AUTO and meta.get("auto"):
        return AUTO
    kind = meta["kind"]
    try:
        return parse_bool(text) if kind is bool else kind(text)
    except ValueError as exc:
        raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from exc
