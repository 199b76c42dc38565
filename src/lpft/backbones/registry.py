"""Backbones by name: ``efficientnet-lite0``, ``minilm-l6``, ``timm:<name>``, ``torchvision:<name>``, ``hf:<id-or-path>``."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from lpft.backbones.base import Backbone, BackboneError, ImageBackbone
from lpft.registry import Registry, load_plugins

BackboneFactory = Callable[..., Backbone]
_EXACT: Registry[BackboneFactory] = Registry("backbone")
_PREFIX: Registry[BackboneFactory] = Registry("backbone prefix")
IMAGE_SIZES = range(8, 4097)  # pixels: smaller leaves no backbone's stem anything to see; larger is a typo


def register_backbone(name: str, prefix: bool = False) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory; with ``prefix=True`` it serves ``name:<anything>`` and receives that suffix as ``model``."""

    return (_PREFIX if prefix else _EXACT).register(name)


def backbone_names() -> list[str]:
    _import_builtin()
    return _EXACT.names() + [f"{p}:<name>" for p in _PREFIX.names()]


def create_backbone(name: str, **options: Any) -> Backbone:
    """Build the backbone called ``name``; options (``weights``, ``image_size``, ...) go to its factory.

    ``augment`` (an image backbone's preset, :data:`~lpft.backbones.base.AUGMENT_PRESETS`) is
    taken here, for every image backbone alike.

    ``weights`` may be a local file (``.safetensors`` or a torch state dict), ``"random"``
    for an untrained network, or ``"download"`` to let the library fetch them; nothing is
    downloaded unless asked. An option the backbone does not take, or an ``image_size``
    outside :data:`IMAGE_SIZES`, is a :class:`BackboneError` before anything is built.
    """
    _import_builtin()
    options = {k: v for k, v in options.items() if v is not None}
    prefix, sep, model = name.partition(":")
    if name in _EXACT:
        factory, given = _EXACT[name], {}
    elif sep and prefix in _PREFIX and model:
        factory, given = _PREFIX[prefix], {"model": model}
    else:
        raise BackboneError(f"unknown backbone {name!r}; choose from {backbone_names()}")
    augment = options.pop("augment", "none")
    _check_options(name, factory, options)
    backbone = factory(**given, **options)
    if augment != "none":
        if not isinstance(backbone, ImageBackbone):
            raise BackboneError(f"{_named('augment')} applies to image backbones; {name!r} reads {backbone.modality}")
        backbone.set_augment(augment)
    return backbone


def factory_options(factory: BackboneFactory) -> list[str] | None:
    """The options ``factory`` takes (``model``, a prefix factory's suffix, aside); None when it cannot tell.

    A factory that passes ``**options`` on is read through its return annotation:
    ``def timm_backbone(model, **options) -> TimmBackbone`` takes what ``TimmBackbone()`` takes.
    """
    signature = inspect.signature(factory)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        try:
            built = typing.get_type_hints(factory).get("return")
        except (NameError, TypeError):  # an annotation that does not resolve
            return None
        if not inspect.isclass(built):
            return None
        signature = inspect.signature(built)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in keyword and p.name != "model"]


def _check_options(name: str, factory: BackboneFactory, options: dict[str, Any]) -> None:
    """Refuse, naming the option and its flag, what the factory would choke on or build nonsense from."""
    takes = factory_options(factory)
    unknown = [k for k in options if takes is not None and k not in takes]
    if unknown:
        raise BackboneError(f"backbone {name!r} takes no {_named(unknown[0])}; its options: "
                            f"{', '.join(takes) or 'none'}")
    size = options.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size not in IMAGE_SIZES):
        raise BackboneError(f"{_named('image_size')} must be a whole number of pixels from {IMAGE_SIZES.start} "
                            f"to {IMAGE_SIZES.stop - 1}; got {size!r}")


def _named(option: str) -> str:
    """``image_size`` -> ``image_size (--image-size)``: the option as the API and the command line spell it."""
    return f"{option} (--{option.replace('_', '-')})"


def _import_builtin() -> None:
    import lpft.backbones.adapters  # noqa: F401  (registers the built-in adapters)

    load_plugins("lpft.backbones")
