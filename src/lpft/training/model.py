"""The network fine-tuning trains: a backbone with a linear head, and how its BatchNorm layers behave."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from lpft.backbones.base import Backbone, Batch

BatchNormMode = Literal["frozen", "train"]


class Classifier(nn.Module):
    """A backbone followed by a linear head on its features."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.backbone.features(batch))

    def set_head(self, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor) -> None:
        """Start from a given head, e.g. the linear probe's (LP-FT)."""
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight, dtype=self.head.weight.dtype))
            self.head.bias.copy_(torch.as_tensor(bias, dtype=self.head.bias.dtype))


def set_batchnorm_mode(model: nn.Module, mode: BatchNormMode) -> None:
    """Put BatchNorm layers in eval mode when ``mode == "frozen"`` (call after ``model.train()``)."""
    if mode == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
