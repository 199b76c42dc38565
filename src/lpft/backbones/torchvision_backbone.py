"""torchvision classification models as backbones: the final linear classifier becomes identity."""

from __future__ import annotations

from torch import nn

from lpft.backbones.base import BackboneError, PooledImageBackbone, load_weights_file
from lpft.backbones.registry import register_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionBackbone(PooledImageBackbone):
    """``torchvision.models.get_model(name)`` with weights from a local file, ``"random"`` or ``"download"``."""

    def __init__(self, model: str, weights: str | None = None, image_size: int = 224) -> None:
        import torchvision

        if weights is None:
            raise BackboneError(
                f"torchvision:{model} has no bundled weights and nothing is downloaded unless asked. Pass "
                "weights=/path/to/state_dict.pth (or .safetensors), weights='download' to fetch the "
                "default ImageNet weights, or weights='random' for an untrained network."
            )
        net = torchvision.models.get_model(model, weights="DEFAULT" if weights == "download" else None)
        if weights not in {"download", "random"}:
            missing, unexpected = net.load_state_dict(load_weights_file(weights), strict=False)
            if missing or unexpected:
                raise BackboneError(f"{weights}: does not match torchvision:{model} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        super().__init__(image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.name = f"torchvision:{model}"
        self.feature_dim = _drop_classifier(net)
        self.net = net
        self._identify_weights(weights)


def _drop_classifier(net: nn.Module) -> int:
    """Replace the last ``nn.Linear`` (fc, classifier[-1], heads.head, ...) by identity; return its input size."""
    last_name, last = None, None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise BackboneError(f"{type(net).__name__} has no linear classifier to remove")
    parent = net.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else net
    setattr(parent, last_name.rpartition(".")[2], nn.Identity())
    return int(last.in_features)


@register_backbone("torchvision", prefix=True)
def torchvision_backbone(model: str, **options) -> TorchvisionBackbone:
    return TorchvisionBackbone(model, **options)
