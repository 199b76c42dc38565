"""L2-SP (Li et al., 2018): fine-tuning with the backbone's weights pulled towards the pretrained ones.

The loss gains ``lambda / 2 * ||w - w0||^2`` over the backbone's trainable weights (never the
head), ``w0`` the pretrained weights: weight decay towards the starting point instead of
towards zero. ``lambda = 0`` is FT (or LP-FT with ``head="lp"``) exactly.

This module also holds what the robust fine-tuning variants (L2-SP, layer-wise learning-rate
decay, surgical fine-tuning) share: the ``head`` setting, which starts them from FT's random
head or from LP-FT's linear probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lpft.config import setting
from lpft.methods.base import register_method
from lpft.methods.finetuning import HeadChoiceConfig, HeadChoiceFineTuning
from lpft.training import Classifier
from lpft.training.config import PAPER_FINETUNE
from lpft.training.loop import Penalty

@dataclass
class L2SPConfig(HeadChoiceConfig):
    """FT's protocol plus the L2-SP strength, swept over four decades by default."""

    l2sp_lambda: float = setting(1e-2, "L2-SP strength lambda: adds lambda/2 ||w - w0||^2 over the backbone's "
                                       "weights (w0 pretrained, head excluded) to the mean loss; 0 is plain FT",
                                 minimum=0.0)

    default_grid: ClassVar[dict[str, Any]] = {**PAPER_FINETUNE, "l2sp_lambda": [1e-4, 1e-3, 1e-2, 1e-1]}


def anchor_penalty(parameters: Sequence[nn.Parameter], strength: float) -> Penalty:
    """``strength / 2 * sum ||p - p0||^2`` over ``parameters``, ``p0`` their values now.

    The anchors follow the parameters' device and memory format: the training loop moves the
    model (to the GPU, to channels_last) after the penalty is built.
    """
    params = list(parameters)
    anchors = [p.detach().clone() for p in params]

    def penalty(model: Classifier) -> torch.Tensor:
        for i, (a, p) in enumerate(zip(anchors, params, strict=True)):
            if a.device != p.device or a.stride() != p.stride():
                anchors[i] = torch.empty_like(p).copy_(a)
        return 0.5 * strength * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))

    return penalty


@register_method("l2-sp", label="L2-SP")
class L2SP(HeadChoiceFineTuning):
    """FT (or LP-FT) with the backbone anchored to its pretrained weights by an L2 penalty."""

    config_class = L2SPConfig
    config: L2SPConfig

    def penalty(self, model: Classifier) -> Penalty | None:
        """The anchor penalty on the starting backbone's trainable weights; none at ``lambda = 0``."""
        if self.config.l2sp_lambda == 0:
            return None
        return anchor_penalty(model.backbone.trainable_parameters(), self.config.l2sp_lambda)
