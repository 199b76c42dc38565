"""SPD: selective projection decay toward the pretrained weights, inside an AdamW step.

Tian, Huang and Kira, "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models",
NeurIPS 2024. Full fine-tuning whose optimiser pulls a layer back toward its pretrained weights
``w0`` only when that layer's gradient disagrees with the way it has moved so far; every other
layer trains freely. Per tensor ("layer") ``w`` with gradient ``g``, each step is:

1. the AdamW update: ``w~ = AdamW(w, g)`` (decoupled weight decay too, if set; the paper uses none);
2. selection: the layer is selected when ``c = -<g, w - w0> < 0``, i.e. descent points back
   toward ``w0`` (inconsistent progress); at the first step ``w = w0`` and nothing is selected;
3. for a selected layer, with ``d = ||w - w0||`` before and ``d~ = ||w~ - w0||`` after the AdamW
   update, the deviation ratio ``r = clip((d~ - d) / d~, 0, 1)`` and
   ``w <- w~ - lambda * r * (w~ - w0)``; unselected layers keep ``w~``.

With ``lambda = 1`` a selected layer's distance to ``w0`` cannot grow in that step (``w~`` is
projected onto the sphere of radius ``d``); ``lambda < 1`` allows part of the growth,
``lambda > 1`` pulls the layer back closer than ``d``, and ``lambda = 0`` is plain AdamW. The new head has no pretrained weights, so it trains with
plain AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lpft.config import setting
from lpft.methods.base import register_method
from lpft.methods.finetuning import FineTuning
from lpft.training import Classifier, FastPath, FinetuneConfig
from lpft.training.config import PAPER_FINETUNE


@dataclass
class SPDConfig(FinetuneConfig):
    """FT's loop settings with AdamW-SPD as the optimiser and SPD's strength lambda.

    The paper chooses lambda by ID validation; the default grid spans a mild pull (0.1) to the
    full projection (1.0), over AdamW learning rates suited to full fine-tuning.
    """

    optimizer: str = setting("adamw", "optimiser: SPD is built on AdamW", choices=("adamw",))
    spd_lambda: float = setting(
        1.0, "SPD strength lambda: a selected layer keeps (1 - lambda) of a step's growth in distance to its "
             "pretrained weights (1: none of it, 0: all, i.e. plain AdamW)", minimum=0.0)

    default_grid: ClassVar[dict[str, Any]] = {
        **PAPER_FINETUNE, "optimizer": "adamw", "lr": [1e-5, 3e-5, 1e-4, 3e-4], "spd_lambda": [0.1, 0.5, 1.0],
    }


class AdamWSPD(torch.optim.AdamW):
    """AdamW followed by selective projection decay for each parameter group that carries ``anchors``.

    ``anchors`` is a list of tensors, one per parameter of the group (its pretrained value);
    a group without them is plain AdamW. ``spd_lambda`` is the strength lambda (module docstring).
    """

    def __init__(self, params: Iterable[dict[str, Any]], spd_lambda: float = 1.0, **adamw: Any) -> None:
        if spd_lambda < 0:
            raise ValueError(f"spd_lambda must be >= 0, got {spd_lambda}")
        super().__init__(params, **adamw)
        self.defaults["spd_lambda"] = spd_lambda
        for group in self.param_groups:
            group.setdefault("spd_lambda", spd_lambda)
            anchors = group.get("anchors")
            if anchors is not None and [a.shape for a in anchors] != [p.shape for p in group["params"]]:
                raise ValueError("anchors must match the group's parameters one to one, in shape")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step, then the projection of the selected tensors (no host synchronisation)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending = []  # (param, anchor, lambda where selected else 0, distance to anchor before the step)
        for group in self.param_groups:
            if group.get("anchors") is None:
                continue
            for p, anchor in zip(group["params"], group["anchors"], strict=True):
                if p.grad is None:
                    continue
                deviation = p - anchor
                selected = torch.sum(p.grad * deviation) > 0  # c = -<g, w - w0> < 0
                pending.append((p, anchor, selected * group["spd_lambda"], torch.linalg.vector_norm(deviation)))
        super().step()
        for p, anchor, strength, before in pending:
            deviation = p - anchor
            after = torch.linalg.vector_norm(deviation)
            ratio = torch.where(after > 0, (after - before) / after.clamp_min(torch.finfo(after.dtype).tiny), 0.0)
            p.sub_(deviation * (strength * ratio.clamp(0.0, 1.0)))
        return loss


@register_method("spd", label="SPD")
class SelectiveProjectionDecay(FineTuning):
    """Fine-tune every parameter from a random head with AdamW-SPD (anchored at the pretrained backbone)."""

    config_class = SPDConfig
    config: SPDConfig

    def make_optimizer(self, model: Classifier, config: FinetuneConfig, fast: FastPath) -> torch.optim.Optimizer:
        """AdamW-SPD: the backbone anchored at its starting (pretrained) weights, the head plain AdamW."""
        backbone = list(model.backbone.trainable_parameters())
        groups = [{"params": backbone, "anchors": [p.detach().clone() for p in backbone]},
                  {"params": list(model.head.parameters())}]
        return AdamWSPD(groups, spd_lambda=self.config.spd_lambda, lr=config.lr, weight_decay=config.weight_decay,
                        fused=fast.fused_optimizer or None)
