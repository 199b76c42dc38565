"""Built-in backbone adapters; importing this module registers them."""

from lpft.backbones import efficientnet_lite, hf_text, timm_backbone, torchvision_backbone  # noqa: F401
