"""Before fine-tuning: is this task in the regime where LP-FT beats FT out of distribution?

The paper's argument has two parts, and each has a cheap proxy measured before any training:

1. **Good pretrained features.** LP-FT keeps the pretrained features; that pays only if they
   are already good for the task, i.e. the linear probe alone is strong. Proxy: the probe's
   ID-validation accuracy, normalised between the majority-class rate (0) and perfect (1).
2. **A shift the training data does not span.** Fine-tuning changes features only along
   directions the training inputs span; OOD inputs with much energy outside that span keep
   their old features while the head moves, which is the distortion LP-FT avoids. Proxy: the
   share of each OOD split's centred feature energy outside the principal subspace holding
   99% of the training features' variance (unlabelled OOD inputs only; no OOD label is read).

Also reported, as evidence rather than as part of the verdict: the first-step backbone
gradient under the probe's head relative to a random head (how much the fitted head shields
the features at the start of LP-FT).

The verdict is a fixed rule stated in advance (:data:`GOOD_FEATURES`): LP-FT is expected to
beat FT OOD when the normalised probe accuracy reaches it; otherwise fine-tuning needs to
change the features and FT is expected to do better. docs/regime.md compares the verdict with
measured outcomes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lpft.backbones import Backbone
from lpft.data import Task
from lpft.data.splits import ID_TEST, is_ood
from lpft.data.loader import SplitData
from lpft.features import cached_features
from lpft.methods.finetuning import LinearProbeThenFineTune, LPFTConfig
from lpft.methods.linear_probe import fit_linear_probe
from lpft.training import Classifier

GOOD_FEATURES = 0.7  # normalised probe accuracy on id_val at which the features count as good
SPAN_VARIANCE = 0.99  # the training subspace keeps this share of the training features' variance


@dataclass
class RegimeReport:
    """What :func:`assess` measured, its verdict and the reasons in plain words."""

    task: str
    backbone: str
    probe_accuracy: float
    majority_rate: float
    normalised_accuracy: float
    gradient_ratio: float
    out_of_span: dict[str, float]
    verdict: str  # "lpft" or "ft"
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def out_of_span_energy(train: np.ndarray, other: np.ndarray, keep: float = SPAN_VARIANCE) -> float:
    """Mean share of ``other``'s centred squared norm outside the top principal subspace of ``train``.

    The subspace is the smallest set of principal directions of the centred training features
    that holds ``keep`` of their variance; centring uses the training mean for both.
    """
    mean = train.mean(0, dtype=np.float64)
    centred = train.astype(np.float64) - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    basis = vt[: int(np.searchsorted(energy, keep)) + 1]
    x = other.astype(np.float64) - mean
    inside = x @ basis.T
    total = np.sum(x**2, axis=1)
    return float(np.mean((total - np.sum(inside**2, axis=1)) / np.maximum(total, 1e-30)))


def assess(task: Task, backbone: Backbone, device: torch.device, seed: int = 0) -> RegimeReport:
    """Measure the proxies on ``task`` with ``backbone`` (cached features, one batch of gradients)."""
    probe, _ = fit_linear_probe(task, backbone, device)
    accuracy = float(probe.val_accuracy_)
    method = LinearProbeThenFineTune(LPFTConfig(seed=seed))
    model = Classifier(copy.deepcopy(backbone), task.num_classes)
    model.set_head(probe.coef_, probe.intercept_)
    config = method.config.resolve(len(task.train))
    train = SplitData(model.backbone, task.train, train=True, seed=config.seed)
    start = method.first_step(model, train, config, device, fitted_head=True)
    del model
    val = task.id_val.labels
    majority = float(np.bincount(val).max() / len(val))
    normalised = (accuracy - majority) / max(1.0 - majority, 1e-12)
    train = cached_features(backbone, task.train, device)
    span = {key: out_of_span_energy(train, cached_features(backbone, split, device))
            for key, split in task.eval_splits() if key == ID_TEST or is_ood(key)}
    ratio = float(start["backbone_gradient_ratio"])
    good = normalised >= GOOD_FEATURES
    reasons = [
        f"the linear probe reaches {100 * accuracy:.1f}% on id_val against {100 * majority:.1f}% for the majority "
        f"class: {normalised:.2f} of the way to perfect ({'at least' if good else 'below'} {GOOD_FEATURES}), so the "
        f"pretrained features are {'good enough to keep' if good else 'not good enough: fine-tuning must change them'}",
    ]
    ood = {k: v for k, v in span.items() if is_ood(k)}
    if ood:
        shift = max(ood.values()) - span[ID_TEST]
        reasons.append(
            f"OOD features put {100 * max(ood.values()):.1f}% of their energy outside the span of the training "
            f"features (held-out ID: {100 * span[ID_TEST]:.1f}%): "
            + ("a shift fine-tuning cannot follow, where keeping the features matters" if shift > 0.05 else
               "little more than ID data, so feature distortion has less room to hurt")
        )
    reasons.append(
        f"at the first step the probe's head sends {ratio:.2g}x a random head's gradient into the backbone"
        + (" (it shields the features)" if ratio < 1 else " (it does not shield them: use a small learning rate)")
    )
    return RegimeReport(task.name, backbone.name, accuracy, majority, normalised, ratio, span,
                        "lpft" if good else "ft", reasons)
