"""One small name -> object table, shared by the benchmark, backbone and method registries."""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects; registering a name twice is an error, so plugins cannot shadow each other."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that stores its target under ``name`` and returns it unchanged."""

        def wrap(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return wrap

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def names(self, registered_order: bool = False) -> list[str]:
        """Registered names, sorted, or in the order they were registered."""
        return list(self._items) if registered_order else sorted(self._items)


@functools.cache
def load_plugins(group: str) -> None:
    """Import every installed entry point of ``group`` (``lpft.methods``, ``lpft.backbones``,
    ``lpft.benchmarks``) once: a plugin package registers its methods, backbones or benchmarks
    on import, as lpft's own modules do (docs/extending.md)."""
    for entry in entry_points(group=group):
        entry.load()
