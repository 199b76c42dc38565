"""Feature-distortion diagnostics: how far tuning moved a backbone, and where.

The paper explains FT's OOD loss by *feature distortion*: from a random head, FT changes the
features of ID inputs more than those of OOD inputs, so the new head no longer fits the OOD
features. These functions measure that on a user's own model and data:

- :func:`feature_distortion`: per evaluated split, how features moved from the pretrained
  to the tuned backbone (:func:`lpft.metrics.feature_change`: squared change, relative
  change, cosine distance, linear CKA), and the OOD / ID ratio of the change;
- :func:`weight_change`: relative weight change ``||w - w0|| / ||w0||`` per block;
- :func:`initial_model` and :func:`first_step_stats`: the head norm, training loss and
  gradient norms at the first FT step, where LP-FT's fitted head gives small gradients;
- :func:`reliability_bins`: the reliability diagram behind the ECE that evaluation reports.

:func:`diagnose_run` applies all of them to a run saved with :mod:`lpft.artifacts`, and
:func:`plot_diagnoses` draws several diagnosed runs side by side.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lpft.artifacts import load_run, load_run_models, load_run_task, save_run
from lpft.backbones import Backbone, create_backbone
from lpft.data import Split, Task, load_task
from lpft.experiment import RunRecord, resolve_device, run_method
from lpft.features import SplitData, cached_features, compute_features, to_device
from lpft.finetune import Classifier, FinetuneConfig, set_batchnorm_mode
from lpft.methods import create_method
from lpft.methods.finetuning import FineTuning
from lpft.metrics import feature_change, softmax

log = logging.getLogger(__name__)

ID_REFERENCE = "id_test"  # the OOD/ID ratio divides by the change on held-out ID inputs
N_BINS = 15  # as lpft.metrics.calibration_report's ECE


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
        if key.startswith("ood/")
    }


def block_name(parameter: str) -> str:
    """The block a parameter belongs to: its name up to the first numeric part (``layer1.0``,
    ``net._blocks.3``, ``encoder.layer.5``), else its module (``net._conv_stem``)."""
    parts = parameter.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parameter


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


def initial_model(
    task: Task, backbone: Backbone, method: str, config: FinetuneConfig, device: torch.device | str = "cpu"
) -> Classifier:
    """The network a fine-tuning method starts from: the pretrained backbone and its head init.

    Rebuilt the way :class:`~lpft.methods.finetuning.FineTuning` builds it (seeded random
    head for FT, the linear probe's head for LP-FT), so the first-step statistics of a run
    can be computed without hooking into its training loop. The global RNG is left untouched.
    """
    m = create_method(method)
    if not isinstance(m, FineTuning):
        raise ValueError(f"method {method!r} does not fine-tune; first-step statistics need FT, LP-FT or a subclass")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Classifier(copy.deepcopy(backbone), task.num_classes)
    m.init_head(model, task, backbone, torch.device(device))
    return model


def first_step_stats(
    model: Classifier, train: SplitData, config: FinetuneConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Loss and gradient norms at the first FT step, before any update.

    Uses the first batch the training loop draws (the seeded permutation of
    :func:`lpft.finetune.finetune`), with the model in training mode and BatchNorm set as
    ``config.bn_mode``; stochastic layers (drop-connect) are seeded too. Gradients come from
    ``torch.autograd.grad`` so the model's ``.grad`` fields stay untouched. A fitted head
    (LP-FT) gives a low loss and small gradients, hence little feature change.
    """
    model.to(device)
    was_training = model.training
    model.train()
    set_batchnorm_mode(model, config.bn_mode)
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[: config.batch_size].numpy()
    head = list(model.head.parameters())
    body = list(model.backbone.trainable_parameters())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            logits = model(to_device(train.batch(index), device))
        loss = nn.functional.cross_entropy(logits, train.labels[index].to(device))
        grads = torch.autograd.grad(loss, head + body, allow_unused=True)
    finally:
        model.train(was_training)

    def norm(gs: Iterable[torch.Tensor | None]) -> float:
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None))

    return {
        "loss": float(loss.detach()),
        "grad_norm_head": norm(grads[: len(head)]),
        "grad_norm_backbone": norm(grads[len(head) :]),
        "grad_norm_total": norm(grads),
        "head_norm": float(model.head.weight.detach().norm()),
        "batch_size": len(index),
    }


def run_and_save(
    task: str | Path | Task,
    backbone: str,
    method: str,
    config: FinetuneConfig,
    out_dir: Path | str,
    device: str = "auto",
    backbone_options: dict[str, Any] | None = None,
    task_options: dict[str, Any] | None = None,
) -> RunRecord:
    """:func:`lpft.experiment.run`, then save what a later diagnosis needs (:func:`lpft.artifacts.save_run`).

    First-step statistics are computed before training from :func:`initial_model` (for
    LP-FT this fits the linear probe once more, on cached features), so the training loop
    itself needs no hook. ``task`` is a benchmark name or YAML path (recorded, so the
    diagnosis can rebuild it) or a Task (then the diagnosis needs it passed in).
    """
    spec = None if isinstance(task, Task) else task
    task = task if isinstance(task, Task) else load_task(task, **(task_options or {}))
    bb = create_backbone(backbone, **(backbone_options or {}))
    if bb.modality != task.modality:
        raise ValueError(f"backbone {backbone!r} reads {bb.modality} but task {task.name!r} is a {task.modality} task")
    dev = resolve_device(device)
    first_step = None
    if isinstance(create_method(method), FineTuning):
        start = initial_model(task, bb, method, config, dev)
        first_step = first_step_stats(start, SplitData(start.backbone, task.train), config, dev)
        log.info("first FT step: loss %.4f, gradient norm head %.4g, total %.4g",
                 first_step["loss"], first_step["grad_norm_head"], first_step["grad_norm_total"])
        del start
    record, result = run_method(task, bb, method, config, dev)
    save_run(out_dir, record, result, bb, backbone_options, spec, task_options, first_step)
    return record


def reliability_bins(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, n_bins: int = N_BINS) -> dict[str, list]:
    """Per confidence bin: count, mean confidence and accuracy (a reliability diagram).

    Bins are ``(i/n, (i+1)/n]`` as in :func:`lpft.metrics.expected_calibration_error`, so
    ``sum_b count_b |accuracy_b - confidence_b| / N`` is that ECE. Empty bins hold NaN.
    """
    p = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"count": count.tolist(), "confidence": confidence.tolist(), "accuracy": acc.tolist()}


def diagnose_run(
    path: Path | str,
    device: torch.device | str = "cpu",
    max_examples: int | None = None,
    task: Task | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Everything above for one run saved by :func:`lpft.artifacts.save_run`, as a JSON-ready dict.

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
    temperature = record.metrics["id_val"]["temperature"]
    out["reliability"] = {
        key: {"before": reliability_bins(run.logits[key], split.labels),
              "after": reliability_bins(run.logits[key], split.labels, temperature)}
        for key, split in task.eval_splits() if key != "id_val"
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
    """``FT lr=0.003``-style name for tables and legends."""
    name = method.upper().replace("LPFT", "LP-FT")
    return f"{name} lr={hyperparameters['lr']:.3g}" if "lr" in hyperparameters and method != "lp" else name


def plot_diagnoses(diagnoses: Sequence[dict[str, Any]], path: Path | str) -> Path:
    """One PNG: relative feature change per split and run, weight change per block, and
    a reliability diagram (ID test vs each OOD split, before temperature scaling) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(diagnoses)
    cols = max(2, n)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.6), squeeze=False)
    splits = [k for k in diagnoses[0]["feature_change"]]
    width = 0.8 / n
    ax = axes[0, 0]
    values = []
    for i, d in enumerate(diagnoses):
        ys = [100 * d["feature_change"][s]["relative_change"] for s in splits]
        values += [y for y in ys if y > 0]
        ax.bar(np.arange(len(splits)) + (i - (n - 1) / 2) * width, ys, width, label=d["label"])
    ax.set_xticks(np.arange(len(splits)), [s.replace("ood/", "OOD ") for s in splits], rotation=20)
    ax.set_ylabel("relative feature change x100")
    ax.set_title("feature change: ||f - f0||² / ||f0||²")
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for d in diagnoses:
        blocks = d["weight_change"]["blocks"]
        ax.plot(range(len(blocks)), [b["relative_change"] for b in blocks], marker=".", label=d["label"])
    if any(b["relative_change"] > 0 for d in diagnoses for b in d["weight_change"]["blocks"]):
        ax.set_yscale("log")
    ax.set_xlabel("block (input -> output)")
    ax.set_ylabel("||w - w0|| / ||w0||")
    ax.set_title("weight change per block")
    ax.legend(fontsize=8)
    for ax in axes[0, 2:]:
        ax.axis("off")
    for i, d in enumerate(diagnoses):
        ax = axes[1, i]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for key, bins in d["reliability"].items():
            conf, acc = np.asarray(bins["before"]["confidence"]), np.asarray(bins["before"]["accuracy"])
            ok = np.isfinite(conf)
            ece = d["calibration"][key]["ece"]
            ax.plot(conf[ok], acc[ok], marker="o", ms=3, label=f"{key.replace('ood/', 'OOD ')} (ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability: {d['label']}")
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[1, n:]:
        ax.axis("off")
    fig.suptitle(f"{diagnoses[0]['task']} / {diagnoses[0]['backbone']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
