"""LP: a linear head on frozen, cached features, regularisation chosen on ID validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from lpft.backbones.base import Backbone
from lpft.config import AUTO, MethodConfig, setting
from lpft.data.splits import ID_VAL, TRAIN
from lpft.data.task import Task
from lpft.features import cached_features
from lpft.methods.base import Method, MethodResult, register_method
from lpft.probe import LinearProbe
from lpft.training import Classifier

log = logging.getLogger(__name__)


@dataclass
class LinearProbeConfig(MethodConfig):
    """The probe's one knob: its inverse L2 strength, searched along a path unless given."""

    C: float = setting(AUTO, "inverse L2 strength; 'auto': the probe's own C path, chosen on id_val",
                       kind=float, above=0.0, auto=True)

    default_grid: ClassVar[dict[str, Any]] = {"C": AUTO}


def fit_linear_probe(
    task: Task, backbone: Backbone, device: torch.device, C: float | str = AUTO
) -> tuple[LinearProbe, dict[str, np.ndarray]]:
    """Fit the probe on cached features; return it and its logits on every evaluated split.

    ``C="auto"`` walks the probe's C path and keeps the best ID-validation accuracy; a
    number fits that C alone (one point of an explicit grid, so selection rules choose
    across trials).
    """
    backbone.to(device)
    feats = {key: cached_features(backbone, split, device) for key, split in task.splits()}
    probe = LinearProbe(None if C == AUTO else [float(C)], device=str(device)).fit(
        feats[TRAIN], task.train.labels, feats[ID_VAL], task.id_val.labels, n_classes=task.num_classes
    )
    logits = {key: feats[key] @ probe.coef_.T + probe.intercept_ for key, _ in task.eval_splits()}
    return probe, logits


@register_method("lp", label="LP")
class LinearProbing(Method):
    """Freeze the backbone; fit an L2 logistic-regression head along a path of C values."""

    config_class = LinearProbeConfig
    config: LinearProbeConfig

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        probe, logits = fit_linear_probe(task, backbone, device, self.config.C)
        log.info("linear probe: C=%.3g, id_val accuracy %.4f", probe.best_C_, probe.val_accuracy_)
        model = Classifier(backbone, task.num_classes)  # the frozen backbone itself, not a copy: only the head is new
        model.set_head(probe.coef_, probe.intercept_)
        return MethodResult(logits=logits, selected={"C": float(probe.best_C_)}, history=list(probe.path_), model=model,
                            tuned_backbone=False)
