"""A method added the way docs/extending.md says: one file, one registration, no other module changed.

``shrunk-lp`` fits the linear probe at one C and multiplies its weights by ``shrink``: a knob
no built-in method has, so the test proves it reaches flags, sweeps and reports by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lpft.backbones import Backbone
from lpft.config import MethodConfig, setting
from lpft.data import Task
from lpft.features import cached_features
from lpft.methods import Method, MethodResult, register_method
from lpft.methods.linear_probe import fit_linear_probe


@dataclass
class ShrunkProbeConfig(MethodConfig):
    C: float = setting(1.0, "inverse L2 strength of the probe", above=0.0)
    shrink: float = setting(1.0, "factor applied to the probe's weights (not its bias)", above=0.0)

    default_grid: ClassVar[dict[str, Any]] = {"shrink": [0.5, 1.0]}


@register_method("shrunk-lp", label="Shrunk LP")
class ShrunkProbe(Method):
    """The linear probe at a fixed C, its weight matrix scaled by ``shrink``."""

    config_class = ShrunkProbeConfig
    config: ShrunkProbeConfig

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        probe, _ = fit_linear_probe(task, backbone, device, self.config.C)
        logits = {}
        for key, split in task.eval_splits():
            feats = cached_features(backbone, split, device)
            logits[key] = self.config.shrink * (feats @ probe.coef_.T) + probe.intercept_
        return MethodResult(logits=logits, selected={"C": self.config.C})
