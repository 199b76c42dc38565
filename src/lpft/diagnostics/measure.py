"""Feature-distortion diagnostics: how far tuning moved a backbone, and where.

The paper explains FT's OOD loss by *feature distortion*: from a random head, FT changes the
features of ID inputs more than those of OOD inputs, so the new head no longer fits the OOD
features. These functions measure that on a user's own model and data:

- :func:`feature_distortion`: per evaluated split, how features moved from the pretrained
  to the tuned backbone (:func:`lpft.evaluation.metrics.feature_change`: squared change, relative
  change, cosine distance, linear CKA), and the OOD / ID ratio of the change;
- :func:`weight_change`: relative weight change ``||w - w0|| / ||w0||`` per block;
- :func:`reliability_bins`: the reliability diagram behind the ECE that evaluation reports.

:func:`diagnose_run` applies all of them to a run saved with :mod:`lpft.runs.artifacts`,
together with the first training step the method measured (:mod:`lpft.training.first_step`);
:mod:`lpft.diagnostics.plot` draws several diagnosed runs side by side.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lpft.backbones import Backbone
from lpft.backbones.base import block_name
from lpft.data import Split, Task
from lpft.data.splits import ID_TEST, ID_VAL, is_ood
from lpft.evaluation.metrics import feature_change, reliability_bins
from lpft.data.loader import SplitData
from lpft.features import cached_features, compute_features
from lpft.methods import method_label
from lpft.runs.artifacts import load_run, load_run_models, load_run_task

log = logging.getLogger(__name__)

ID_REFERENCE = ID_TEST  # the OOD/ID ratio divides by the change on held-out ID inputs


def _subset(split: Split, max_examples: int | None, seed: int) -> tuple[Split, np.ndarray]:
    """A seeded random subset of at most ``max_examples`` rows (all rows, in order, otherwise)."""
    n = len(split)
    if max_examples is None or n <= max_examples:
        return split, np.arange(n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=max_examples, replace=False))
    inputs = split.inputs[rows] if isinstance(split.inputs, np.ndarray) else [split.inputs[i] for i in rows]
    return Split(split.name, inputs, split.labels[rows], split.source), rows


def feature_distortion(
    pretrained: Backbone,
    tuned: Backbone,
    task: Task,
    device: torch.device | str = "cpu",
    max_examples: int | None = None,
    seed: int = 0,
    head: nn.Linear | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Feature change from ``pretrained`` to ``tuned`` on every evaluated split of ``task``.

    Returns ``({split: feature_change(...) + {"n"}}, {split: tuned logits})``; the logits
    (``head`` applied to the tuned features, only when ``head`` is given) let a caller check
    that saved weights reproduce a run. Pretrained features come from the feature cache.
    ``max_examples`` caps each split by a seeded subset, for speed on large splits.
    """
    changes: dict[str, dict[str, float]] = {}
    logits: dict[str, np.ndarray] = {}
    pretrained.to(device)
    tuned.to(device)
    for key, split in task.eval_splits():
        part, rows = _subset(split, max_examples, seed)
        f0 = cached_features(pretrained, split, device)[rows]
        f1 = compute_features(tuned, SplitData(tuned, part), device, desc=f"tuned features {key}")
        changes[key] = {**feature_change(f0, f1), "n": len(rows)}
        if head is not None:
            with torch.no_grad():
                logits[key] = head.to(device)(torch.from_numpy(f1).to(device)).float().cpu().numpy()
        log.info("%s: relative feature change %.4g, CKA %.4f", key, changes[key]["relative_change"], changes[key]["cka"])
    return changes, logits


def ood_id_ratio(changes: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per OOD split, its squared and relative feature change divided by the ID test split's.

    Below 1 means ID features moved more than OOD ones: the distortion the paper predicts for FT.
    """
    ref = changes[ID_REFERENCE]
    return {
        key: {m: (v[m] / ref[m] if ref[m] > 0 else math.nan) for m in ("mean_sq_change", "relative_change")}
        for key, v in changes.items()
        if is_ood(key)
    }


def weight_change(pretrained: nn.Module, tuned: nn.Module) -> dict[str, Any]:
    """Relative weight change ``||w - w0|| / ||w0||`` per block (in network order) and overall.

    Parameters are grouped by :func:`block_name`; norms are Frobenius over all of a block's
    parameters. Both modules must have the same parameter names and shapes.
    """
    before = dict(pretrained.named_parameters())
    after = dict(tuned.named_parameters())
    if before.keys() != after.keys():
        diff = sorted(before.keys() ^ after.keys())
        raise ValueError(f"pretrained and tuned networks differ in parameters, e.g. {diff[:3]}")
    sums: dict[str, list[float]] = {}  # block -> [||dw||^2, ||w0||^2, n parameters]
    for name, w0 in before.items():
        w = after[name]
        if w.shape != w0.shape:
            raise ValueError(f"parameter {name}: pretrained shape {tuple(w0.shape)} but tuned {tuple(w.shape)}")
        a, b = w0.detach().double().cpu(), w.detach().double().cpu()
        acc = sums.setdefault(block_name(name), [0.0, 0.0, 0])
        acc[0] += float(((b - a) ** 2).sum())
        acc[1] += float((a**2).sum())
        acc[2] += a.numel()
    blocks = [
        {"block": k, "relative_change": math.sqrt(d / n0) if n0 > 0 else math.nan, "norm": math.sqrt(n0), "parameters": int(p)}
        for k, (d, n0, p) in sums.items()
    ]
    total_d, total_0 = sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())
    return {"total": math.sqrt(total_d / total_0) if total_0 > 0 else math.nan, "blocks": blocks}


def diagnose_run(
    path: Path | str,
    device: torch.device | str = "cpu",
    max_examples: int | None = None,
    task: Task | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Everything above for one run saved by :func:`lpft.runs.artifacts.save_run`, as a JSON-ready dict.

    ``task`` overrides the task named in ``run.json`` (needed for tasks built from arrays).
    Calibration (ECE, NLL, Brier before and after temperature scaling on ID validation) is
    copied from the run's own metrics; reliability bins come from its saved logits. A run
    without tuned weights (LP) has a frozen backbone: its feature change is zero by design.
    """
    run = load_run(path)
    task = task or load_run_task(run)
    pretrained, tuned = load_run_models(run, task.num_classes)
    record = run.record
    out: dict[str, Any] = {
        "run": str(run.path),
        "label": label or run_label(record.method, record.hyperparameters),
        "task": record.task,
        "backbone": record.backbone,
        "method": record.method,
        "hyperparameters": record.hyperparameters,
        "selected": record.selected,
    }
    if tuned is not None:
        changes, logits = feature_distortion(pretrained, tuned.backbone, task, device, max_examples, head=tuned.head)
        out["feature_change"] = changes
        out["ood_id_ratio"] = ood_id_ratio(changes)
        out["weight_change"] = weight_change(pretrained, tuned.backbone)
        out["head"] = {"norm": float(tuned.head.weight.detach().norm()), "bias_norm": float(tuned.head.bias.detach().norm())}
        out["logits_check"] = _logits_check(run.logits, logits, task, max_examples)
    else:
        out["feature_change"] = {key: {**feature_change(f := cached_features(pretrained, s, device), f), "n": len(s)}
                                 for key, s in task.eval_splits()}
        out["ood_id_ratio"] = {k: {"mean_sq_change": math.nan, "relative_change": math.nan} for k in task.ood}
        out["weight_change"] = weight_change(pretrained, pretrained)
        out["head"] = {}
    out["first_step"] = run.first_step
    out["calibration"] = record.metrics
    temperature = record.metrics[ID_VAL]["temperature"]
    out["reliability"] = {
        key: {"before": reliability_bins(run.logits[key], split.labels),
              "after": reliability_bins(run.logits[key], split.labels, temperature)}
        for key, split in task.eval_splits() if key != ID_VAL
    }
    return out


def _logits_check(saved: dict[str, np.ndarray], recomputed: dict[str, np.ndarray], task: Task, max_examples: int | None) -> dict[str, float]:
    """How closely the reloaded weights reproduce the run's own logits (a guard against a wrong task or weights)."""
    worst, agree = 0.0, []
    for key, split in task.eval_splits():
        _, rows = _subset(split, max_examples, 0)
        a, b = saved[key][rows], recomputed[key]
        worst = max(worst, float(np.abs(a - b).max()))
        agree.append(float(np.mean(a.argmax(1) == b.argmax(1))))
    if min(agree) < 0.99:
        log.warning("reloaded weights reproduce only %.1f%% of the run's predictions: wrong task or weights?", 100 * min(agree))
    return {"max_abs_diff": worst, "min_prediction_agreement": min(agree)}


def run_label(method: str, hyperparameters: dict[str, Any]) -> str:
    """``FT lr=0.003``-style name for tables and legends: the method's label and its learning rate, if it has one."""
    name = method_label(method)
    return f"{name} lr={hyperparameters['lr']:.3g}" if "lr" in hyperparameters else name
