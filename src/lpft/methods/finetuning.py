"""FT (random head) and LP-FT (head from the linear probe): the same loop, a different start."""

from __future__ import annotations

import copy

import torch

from lpft.backbones.base import Backbone
from lpft.data.task import Task
from lpft.features import SplitData
from lpft.finetune import Classifier, FinetuneConfig, StepCallback, finetune
from lpft.methods.base import Method, MethodResult, register_method
from lpft.methods.linear_probe import fit_linear_probe


@register_method("ft")
class FineTuning(Method):
    """Train every parameter from a randomly initialised head."""

    def __init__(self, before_step: StepCallback | None = None) -> None:
        self.before_step = before_step  # a hook for tests and diagnostics

    def init_head(self, model: Classifier, task: Task, backbone: Backbone, device: torch.device) -> dict:
        """Head start; returns what it chose. FT keeps nn.Linear's seeded random init."""
        return {}

    def fit(self, task: Task, backbone: Backbone, config: FinetuneConfig, device: torch.device) -> MethodResult:
        torch.manual_seed(config.seed)  # the random head, reproducibly
        model = Classifier(copy.deepcopy(backbone), task.num_classes)
        selected = self.init_head(model, task, backbone, device)
        train = SplitData(model.backbone, task.train)
        evals = {key: SplitData(model.backbone, split) for key, split in task.eval_splits()}
        result = finetune(model, train, evals, config, device, before_step=self.before_step)
        return MethodResult(
            logits=result.logits, selected={**selected, "epoch": result.best_epoch}, history=result.history, model=model
        )


@register_method("lpft")
class LinearProbeThenFineTune(FineTuning):
    """Fit the linear probe first, then fine-tune everything starting from its head."""

    def init_head(self, model: Classifier, task: Task, backbone: Backbone, device: torch.device) -> dict:
        probe, _ = fit_linear_probe(task, backbone, device)
        model.set_head(probe.coef_, probe.intercept_)
        return {"lp_C": float(probe.best_C_)}
