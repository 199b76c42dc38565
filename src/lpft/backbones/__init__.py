"""Backbones: the contract, a registry and adapters for bundled, timm, torchvision and Hugging Face models."""

from lpft.backbones.base import Backbone, BackboneError, Batch
from lpft.backbones.registry import backbone_names, create_backbone, register_backbone

__all__ = ["Backbone", "BackboneError", "Batch", "backbone_names", "create_backbone", "register_backbone"]
