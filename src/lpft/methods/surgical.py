"""Surgical fine-tuning (Lee et al., 2023): tune one third of the backbone's blocks and the head, freeze the rest.

The backbone's depth-ordered :meth:`~lpft.backbones.Backbone.blocks` are cut into ``early``,
``middle`` and ``late`` thirds; which third suits a distribution shift depends on the shift
(input-level shifts favour early blocks, output-level ones late blocks), so the default sweep
tries all three and ID validation chooses. The frozen blocks are excluded from the optimiser
and from backpropagation (``requires_grad`` off on the training copy), so their weights come
out bit-identical. Under ``bn_mode="train"`` BatchNorm running statistics still update
everywhere, frozen blocks included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lpft.backbones.base import Backbone, Block
from lpft.config import setting
from lpft.data.task import Task
from lpft.errors import BackboneError
from lpft.methods.base import MethodResult, register_method
from lpft.methods.finetuning import HeadChoiceConfig, HeadChoiceFineTuning
from lpft.training import Classifier, FastPath, FinetuneConfig
from lpft.training.config import PAPER_FINETUNE
from lpft.training.loop import optimizer_for

GROUPS = ("early", "middle", "late")


@dataclass
class SurgicalConfig(HeadChoiceConfig):
    """FT's protocol plus which third of the backbone trains; all three are swept by default."""

    group: str = setting("late", "the third of the backbone's blocks (input to output) that trains with the head; "
                                 "the other blocks stay frozen", choices=GROUPS)

    default_grid: ClassVar[dict[str, Any]] = {**PAPER_FINETUNE, "group": list(GROUPS)}


def block_group(blocks: list[Block], group: str) -> list[Block]:
    """The ``early``, ``middle`` or ``late`` third of depth-ordered ``blocks`` (thirds differ by at most one block)."""
    if len(blocks) < len(GROUPS):
        raise BackboneError(f"surgical fine-tuning splits a backbone's blocks into thirds; it has {len(blocks)}")
    cuts = [round(len(blocks) * k / len(GROUPS)) for k in range(len(GROUPS) + 1)]
    k = GROUPS.index(group)
    return blocks[cuts[k] : cuts[k + 1]]


@register_method("surgical", label="Surgical FT")
class SurgicalFineTuning(HeadChoiceFineTuning):
    """FT (or LP-FT) of one group of blocks and the head; every other backbone weight stays pretrained."""

    config_class = SurgicalConfig
    config: SurgicalConfig

    def initial_model(self, task: Task, backbone: Backbone, device: torch.device) -> tuple[Classifier, dict]:
        """FT's start with every block outside ``config.group`` frozen in the copy (no gradient computed)."""
        model, selected = super().initial_model(task, backbone, device)
        tuned = {id(p) for block in block_group(model.backbone.blocks(), self.config.group) for p in block.parameters}
        for p in model.backbone.parameters():
            if id(p) not in tuned:
                p.requires_grad_(False)
        return model, selected

    def make_optimizer(self, model: Classifier, config: FinetuneConfig, fast: FastPath) -> torch.optim.Optimizer:
        """The configured optimiser over what :meth:`initial_model` left trainable: the chosen blocks and the head."""
        return optimizer_for(config, fast, [p for p in model.parameters() if p.requires_grad])

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        result = super().fit(task, backbone, device)
        for p, source in zip(result.model.backbone.parameters(), backbone.parameters(), strict=True):
            p.requires_grad_(source.requires_grad)  # the frozen copy is handed back as trainable as it was given
        result.diagnostics["tuned_blocks"] = [block.name for block in block_group(backbone.blocks(), self.config.group)]
        return result
