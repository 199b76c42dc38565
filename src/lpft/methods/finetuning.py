"""FT (random head) and LP-FT (head from the linear probe): the same loop, a different start."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lpft.backbones.base import Backbone
from lpft.config import setting
from lpft.data.task import Task
from lpft.data.loader import SplitData
from lpft.methods.base import Method, MethodResult, register_method
from lpft.methods.linear_probe import fit_linear_probe
from lpft.training import Classifier, FastPath, FinetuneConfig, StepCallback, finetune
from lpft.training.config import PAPER_FINETUNE
from lpft.training.first_step import first_step_stats
from lpft.training.loop import Penalty, build_optimizer

log = logging.getLogger(__name__)

# A fitted head that still sends this share of a random head's first-step gradient into the
# backbone does not protect the features the way LP-FT relies on.
GRADIENT_RATIO_WARNING = 0.5


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

    def penalty(self, model: Classifier) -> Penalty | None:
        """A regulariser added to the training loss, built from the starting ``model`` (none for FT)."""
        return None

    def make_optimizer(self, model: Classifier, config: FinetuneConfig, fast: FastPath) -> torch.optim.Optimizer:
        """The optimiser over what this method trains (FT: every trainable parameter, one learning rate)."""
        return build_optimizer(model, config, fast)

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        config = self.config.resolve(len(task.train))
        model, selected = self.initial_model(task, backbone, device)
        train = SplitData(model.backbone, task.train, train=True, seed=config.seed)
        evals = {key: SplitData(model.backbone, split) for key, split in task.eval_splits()}
        diagnostics = self.first_step(model, train, config, device, fitted_head=bool(selected))
        result = finetune(model, train, evals, config, device, before_step=self.before_step,
                          penalty=self.penalty(model), make_optimizer=self.make_optimizer)
        if result.best_epoch == 0:
            log.warning("%s: no epoch beat the starting model on id_val; the run keeps its start", self.label)
        return MethodResult(logits=result.logits, selected={**selected, "epoch": result.best_epoch},
                            history=result.history, model=model,
                            diagnostics={**diagnostics, "fast_path": result.fast_path})

    def first_step(self, model: Classifier, train: SplitData, config: FinetuneConfig, device: torch.device,
                   fitted_head: bool) -> dict:
        """First-step statistics, logged; for a fitted head also against a seeded random head on the same batch.

        The paper's mechanism in one number: the backbone gradient under the fitted head over that
        under a random head. Near 1, the fitted head does not shield the features (a warning).
        """
        stats = first_step_stats(model, train, config, device)
        log.info("first step: loss %.4f, head norm %.3g, gradient norm head %.3g, backbone %.3g",
                 stats["loss"], stats["head_norm"], stats["grad_norm_head"], stats["grad_norm_backbone"])
        out: dict = {"first_step": stats}
        if not fitted_head:
            return out
        fitted = [p.detach().clone() for p in model.head.parameters()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model.head.reset_parameters()
        random = first_step_stats(model, train, config, device)
        with torch.no_grad():
            for p, saved in zip(model.head.parameters(), fitted, strict=True):
                p.copy_(saved)
        ratio = stats["grad_norm_backbone"] / max(random["grad_norm_backbone"], 1e-30)
        out.update(first_step_random_head=random, backbone_gradient_ratio=ratio)
        log.info("backbone gradient under the fitted head: %.3g of a random head's", ratio)
        if ratio > GRADIENT_RATIO_WARNING:
            log.warning("the fitted head leaves %.0f%% of a random head's first-step gradient on the backbone: "
                        "expect feature distortion (try a lower learning rate, or LP alone)", 100 * ratio)
        return out


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


HEADS = ("random", "lp")


@dataclass
class HeadChoiceConfig(FinetuneConfig):
    """FT's settings plus where the head starts: FT's random head or LP-FT's linear probe."""

    head: str = setting("random", "head start: 'random' (as FT) or 'lp', the linear probe's head (as LP-FT)",
                        choices=HEADS)


class HeadChoiceFineTuning(FineTuning):
    """FT's loop from the head ``config.head`` names: FT's or LP-FT's ``init_head``, reused as is."""

    config: HeadChoiceConfig

    def init_head(self, model: Classifier, task: Task, backbone: Backbone, device: torch.device) -> dict:
        start = LinearProbeThenFineTune if self.config.head == "lp" else FineTuning
        return start.init_head(self, model, task, backbone, device)
