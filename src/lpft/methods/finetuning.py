"""FT (random head) and LP-FT (head from the linear probe): the same loop, a different start."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lpft.backbones.base import Backbone
from lpft.data.task import Task
from lpft.features import SplitData
from lpft.methods.base import Method, MethodResult, register_method
from lpft.methods.linear_probe import fit_linear_probe
from lpft.training import Classifier, FinetuneConfig, StepCallback, finetune
from lpft.training.config import PAPER_FINETUNE
from lpft.training.first_step import first_step_stats

log = logging.getLogger(__name__)


@register_method("ft", label="FT")
class FineTuning(Method):
    """Train every parameter from a randomly initialised head."""

    config_class: ClassVar[type[FinetuneConfig]] = FinetuneConfig
    config: FinetuneConfig
    before_step: StepCallback | None = None  # a hook for tests and diagnostics

    def init_head(self, model: Classifier, task: Task, backbone: Backbone, device: torch.device) -> dict:
        """Head start; returns what it chose. FT keeps nn.Linear's seeded random init."""
        return {}

    def initial_model(self, task: Task, backbone: Backbone, device: torch.device) -> tuple[Classifier, dict]:
        """The network training starts from (a copy of the backbone and the head init), and what the init chose."""
        torch.manual_seed(self.config.seed)  # the random head, reproducibly
        model = Classifier(copy.deepcopy(backbone), task.num_classes)
        return model, self.init_head(model, task, backbone, device)

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        config = self.config.resolve(len(task.train))
        model, selected = self.initial_model(task, backbone, device)
        train = SplitData(model.backbone, task.train)
        evals = {key: SplitData(model.backbone, split) for key, split in task.eval_splits()}
        first_step = first_step_stats(model, train, config, device)
        log.info("first step: loss %.4f, head norm %.3g, gradient norm head %.3g, backbone %.3g",
                 first_step["loss"], first_step["head_norm"], first_step["grad_norm_head"],
                 first_step["grad_norm_backbone"])
        result = finetune(model, train, evals, config, device, before_step=self.before_step)
        return MethodResult(logits=result.logits, selected={**selected, "epoch": result.best_epoch},
                            history=result.history, model=model, diagnostics={"first_step": first_step})


@dataclass
class LPFTConfig(FinetuneConfig):
    """FT's settings; LP-FT's sweep grid is 10x lower, since it starts from a fitted head (as in the paper)."""

    default_grid: ClassVar[dict[str, Any]] = {**PAPER_FINETUNE, "lr": [3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3]}


@register_method("lpft", label="LP-FT")
class LinearProbeThenFineTune(FineTuning):
    """Fit the linear probe first, then fine-tune everything starting from its head."""

    config_class = LPFTConfig

    def init_head(self, model: Classifier, task: Task, backbone: Backbone, device: torch.device) -> dict:
        probe, _ = fit_linear_probe(task, backbone, device)
        model.set_head(probe.coef_, probe.intercept_)
        log.info("LP stage: C=%.3g, id_val accuracy %.4f", probe.best_C_, probe.val_accuracy_)
        return {"lp_C": float(probe.best_C_)}
