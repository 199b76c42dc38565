"""Backbones by name: ``efficientnet-lite0``, ``minilm-l6``, ``timm:<name>``, ``torchvision:<name>``, ``hf:<id-or-path>``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lpft.backbones.base import Backbone, BackboneError
from lpft.registry import Registry, load_plugins

BackboneFactory = Callable[..., Backbone]
_EXACT: Registry[BackboneFactory] = Registry("backbone")
_PREFIX: Registry[BackboneFactory] = Registry("backbone prefix")


def register_backbone(name: str, prefix: bool = False) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory; with ``prefix=True`` it serves ``name:<anything>`` and receives that suffix as ``model``."""

    return (_PREFIX if prefix else _EXACT).register(name)


def backbone_names() -> list[str]:
    _import_builtin()
    return _EXACT.names() + [f"{p}:<name>" for p in _PREFIX.names()]


def create_backbone(name: str, **options: Any) -> Backbone:
    """Build the backbone called ``name``; options (``weights``, ``image_size``, ...) go to its factory.

    ``weights`` may be a local file (``.safetensors`` or a torch state dict), ``"random"``
    for an untrained network, or ``"download"`` to let the library fetch them; nothing is
    downloaded unless asked.
    """
    _import_builtin()
    options = {k: v for k, v in options.items() if v is not None}
    if name in _EXACT:
        return _EXACT[name](**options)
    prefix, sep, model = name.partition(":")
    if sep and prefix in _PREFIX and model:
        return _PREFIX[prefix](model=model, **options)
    raise BackboneError(f"unknown backbone {name!r}; choose from {backbone_names()}")


def _import_builtin() -> None:
    import lpft.backbones.adapters  # noqa: F401  (registers the built-in adapters)

    load_plugins("lpft.backbones")
