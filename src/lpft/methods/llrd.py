"""Layer-wise learning-rate decay: lower blocks of the backbone train at geometrically smaller rates.

The head trains at the full learning rate and the backbone's block ``k`` from the top (its
depth-ordered :meth:`~lpft.backbones.Backbone.blocks`, the last one ``k = 1``) at
``lr * lr_decay**k``, so the generic early features move least (as in ELECTRA, BEiT and
ULMFiT's discriminative fine-tuning). ``lr_decay = 1`` is FT exactly. The decay is per block,
so its effect depends on how finely a backbone is divided (EfficientNet-Lite0: 18 blocks,
ResNet-18: 9, MiniLM-L6: 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lpft.backbones.base import Backbone
from lpft.config import setting
from lpft.data.task import Task
from lpft.errors import ConfigError
from lpft.methods.base import MethodResult, register_method
from lpft.methods.finetuning import HeadChoiceConfig, HeadChoiceFineTuning
from lpft.training import Classifier, FastPath, FinetuneConfig
from lpft.training.config import PAPER_FINETUNE
from lpft.training.loop import optimizer_for


@dataclass
class LLRDConfig(HeadChoiceConfig):
    """FT's protocol plus the per-block decay of the learning rate."""

    lr_decay: float = setting(0.7, "layer-wise lr decay in (0, 1]: the backbone's k-th block from the top trains "
                                   "at lr * lr_decay**k, the head at lr; 1 is plain FT", above=0.0)

    default_grid: ClassVar[dict[str, Any]] = {**PAPER_FINETUNE, "lr_decay": [0.5, 0.7, 0.9]}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_decay > 1.0:
            raise ConfigError(f"lr_decay ({type(self).__name__}) must be <= 1, got {self.lr_decay!r}")


def decayed_groups(model: Classifier, lr: float, decay: float) -> list[dict[str, Any]]:
    """Optimiser param groups: the backbone's block ``k`` from the top at ``lr * decay**k``, then the head at ``lr``."""
    blocks = model.backbone.blocks()
    groups = [{"params": block.parameters, "lr": lr * decay ** (len(blocks) - i), "name": block.name}
              for i, block in enumerate(blocks)]
    return groups + [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]


@register_method("llrd", label="LLRD")
class LayerwiseLRDecay(HeadChoiceFineTuning):
    """FT (or LP-FT) with the learning rate decaying block by block from the head down to the stem."""

    config_class = LLRDConfig
    config: LLRDConfig

    def make_optimizer(self, model: Classifier, config: FinetuneConfig, fast: FastPath) -> torch.optim.Optimizer:
        """The configured optimiser with one param group (and learning rate) per block, plus the head's."""
        return optimizer_for(config, fast, decayed_groups(model, config.lr, self.config.lr_decay))

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        result = super().fit(task, backbone, device)
        groups = decayed_groups(result.model, 1.0, self.config.lr_decay)
        result.diagnostics["lr_multipliers"] = {g["name"]: g["lr"] for g in groups}
        return result
