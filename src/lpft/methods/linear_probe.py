"""LP: a linear head on frozen, cached features, regularisation chosen on ID validation."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from lpft.backbones.base import Backbone
from lpft.data.task import Task
from lpft.features import cached_features
from lpft.finetune import FinetuneConfig
from lpft.methods.base import Method, MethodResult, register_method
from lpft.probe import LinearProbe

log = logging.getLogger(__name__)


def fit_linear_probe(task: Task, backbone: Backbone, device: torch.device) -> tuple[LinearProbe, dict[str, np.ndarray]]:
    """Fit the probe on cached features; return it and its logits on every evaluated split."""
    backbone.to(device)
    feats = {key: cached_features(backbone, split, device) for key, split in task.splits()}
    probe = LinearProbe(device=str(device)).fit(
        feats["train"], task.train.labels, feats["id_val"], task.id_val.labels, n_classes=task.num_classes
    )
    log.info("linear probe: C=%.3g chosen on id_val", probe.best_C_)
    logits = {key: feats[key] @ probe.coef_.T + probe.intercept_ for key, _ in task.eval_splits()}
    return probe, logits


@register_method("lp")
class LinearProbing(Method):
    """Freeze the backbone; fit an L2 logistic-regression head along a path of C values."""

    def hyperparameters(self, config: FinetuneConfig) -> dict[str, Any]:
        """LP reads no fine-tuning setting; its C is chosen on id_val and reported in ``selected``."""
        return {"seed": config.seed}

    def fit(self, task: Task, backbone: Backbone, config: FinetuneConfig, device: torch.device) -> MethodResult:
        probe, logits = fit_linear_probe(task, backbone, device)
        return MethodResult(logits=logits, selected={"C": float(probe.best_C_)}, history=list(probe.path_))
