"""Model selection rules, one small class each (as in DomainBed).

A rule does two things: within a trial it picks an epoch from the per-epoch history, and
across trials it picks the hyperparameters whose mean score over seeds is best.

- ``id-val`` (:class:`IDValidation`): the best ID-validation epoch and hyperparameters.
  The paper's protocol, the default, and the only rule used for headline tables.
- ``oracle`` (:class:`OODOracle`): selects on an OOD test split (or the mean of all of
  them). It peeks at the test distribution, so it is an upper bound, never an estimate;
  its results carry ``oracle=True`` and its label says "oracle" wherever it appears.
- ``last-epoch`` (:class:`LastEpoch`): the final epoch; hyperparameters by ID validation
  at that epoch. Shows what early stopping on ID validation buys.

LP trials have no epochs: their single "epoch" is the trial's final result.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lpft.data.splits import ID_VAL, is_ood
from lpft.errors import SelectionError
from lpft.registry import Registry
from lpft.runs.record import RunRecord



@dataclass(frozen=True)
class EpochChoice:
    """The epoch a rule picked in one trial, the accuracies there, and the rule's score.

    ``metrics`` holds every metric of every split (calibration too) when the picked epoch is
    the one the trial itself kept; otherwise None, because the per-epoch history stores
    accuracy only.
    """

    seed: int
    epoch: int | None
    accuracy: dict[str, float]
    score: float
    selected: Mapping[str, Any] = field(default_factory=dict)  # what the trial itself chose (e.g. LP's C)
    metrics: Mapping[str, Mapping[str, float]] | None = None
    weight_change: float | None = None  # the kept model's ||w - w0|| / ||w0||, None like ``metrics``


def _choice(trial: RunRecord, epoch: int | None, accuracy: dict[str, float], score: float) -> EpochChoice:
    kept = epoch is None or epoch == trial.selected.get("epoch")
    return EpochChoice(trial.seed, epoch, accuracy, score, trial.selected, trial.metrics if kept else None,
                       trial.diagnostics.get("weight_change") if kept else None)


@dataclass(frozen=True)
class Selection:
    """A rule's pick for one (task, backbone, method): a hyperparameter setting and its seeds.

    ``candidates`` maps every setting tried to its mean score over seeds (what was compared).
    """

    rule: str
    label: str
    oracle: bool
    task: str
    backbone: str
    method: str
    hyperparameters: dict[str, Any]
    choices: tuple[EpochChoice, ...]
    candidates: dict[str, float]

    def accuracies(self, split: str) -> list[float]:
        """Per-seed accuracy on ``split`` at the chosen epochs."""
        return [c.accuracy[split] for c in self.choices]

    def metric(self, split: str, name: str) -> list[float] | None:
        """Per-seed ``name`` (e.g. ``"ece"``) on ``split``, or None when any seed lacks it there."""
        values = [None if c.metrics is None else c.metrics.get(split, {}).get(name) for c in self.choices]
        return None if any(v is None for v in values) else [float(v) for v in values]  # type: ignore[arg-type]


class SelectionRule(ABC):
    """Picks an epoch within a trial and a hyperparameter setting across trials."""

    name: ClassVar[str]
    oracle: ClassVar[bool] = False

    def __init__(self, arg: str | None = None) -> None:
        """``arg`` is what follows ``name:`` in a rule spec; rules that take none refuse one."""
        if arg:
            raise SelectionError(f"rule {self.name!r} takes no argument, got {self.name}:{arg}")

    @property
    def label(self) -> str:
        return self.name

    @abstractmethod
    def choose(self, trial: RunRecord) -> EpochChoice:
        """The epoch this rule keeps in ``trial``, with its score."""

    def select(self, trials: Sequence[RunRecord]) -> list[Selection]:
        """One :class:`Selection` per (task, backbone, method), best mean score over seeds.

        Ties go to the setting seen first, so the order of ``trials`` decides only exact ties.
        """
        groups: dict[tuple[str, str, str], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
        for t in trials:
            groups[(t.task, t.backbone_label, t.method)][t.setting].append(t)
        out = []
        for (task, backbone, method), settings in groups.items():
            choices = {s: [self._complete(t) for t in sorted(ts, key=lambda t: t.seed)] for s, ts in settings.items()}
            for s, ts in settings.items():
                seeds = [t.seed for t in ts]
                if len(set(seeds)) != len(seeds):
                    raise SelectionError(f"{method} on {task} ({backbone}) has seed repeated in setting {s}: {seeds}")
            means = {s: sum(c.score for c in cs) / len(cs) for s, cs in choices.items()}
            best = max(means, key=lambda s: means[s])  # first maximum wins
            out.append(Selection(
                rule=self.name, label=self.label, oracle=self.oracle, task=task, backbone=backbone, method=method,
                hyperparameters=json.loads(best), choices=tuple(choices[best]), candidates=means,
            ))
        return out


    def _complete(self, trial: RunRecord) -> EpochChoice:
        """:meth:`choose`, checked to have an accuracy on every split the trial was evaluated on."""
        choice = self.choose(trial)
        for split in trial.metrics:
            _accuracy(trial, choice.accuracy, split)
        return choice


def _argmax_epoch(trial: RunRecord, score_of: Any) -> EpochChoice:
    best: EpochChoice | None = None
    for epoch, accuracy in trial.epochs():
        score = score_of(trial, accuracy)
        if best is None or score > best.score:  # strict: ties keep the earlier epoch
            best = _choice(trial, epoch, accuracy, score)
    assert best is not None
    return best


def _accuracy(trial: RunRecord, accuracy: Mapping[str, float], split: str) -> float:
    if split not in accuracy:
        raise SelectionError(
            f"{trial.method} trial (seed {trial.seed}, {trial.setting}) on {trial.task} has no per-epoch accuracy on "
            f"{split!r}; it was run without scoring every split each epoch (eval_all_splits_each_epoch)"
        )
    value = float(accuracy[split])
    if math.isnan(value):
        raise SelectionError(f"{trial.method} trial (seed {trial.seed}) has NaN accuracy on {split!r}")
    return value


_RULES: Registry[type[SelectionRule]] = Registry("selection rule")


def register_rule(cls: type[SelectionRule]) -> type[SelectionRule]:
    """Register a rule class under its ``name`` (``lpft report --rules NAME``)."""
    return _RULES.register(cls.name)(cls)


@register_rule
class IDValidation(SelectionRule):
    """Best epoch and hyperparameters by ID-validation accuracy (the paper's rule, headline tables)."""

    name = "id-val"

    def choose(self, trial: RunRecord) -> EpochChoice:
        return _argmax_epoch(trial, lambda t, acc: _accuracy(t, acc, ID_VAL))


@register_rule
class OODOracle(SelectionRule):
    """Best epoch and hyperparameters by accuracy on an OOD test split: an oracle, not an estimate.

    ``split`` is a key such as ``"ood/sketch"``; ``None`` means the mean over all OOD splits.
    """

    name = "oracle"
    oracle = True

    def __init__(self, split: str | None = None) -> None:
        if split is not None and not is_ood(split):
            raise SelectionError(f"the oracle selects on an OOD split ('ood/<name>'), got {split!r}")
        self.split = split

    @property
    def label(self) -> str:
        return f"oracle (selected on {self.split or 'mean OOD'} test accuracy)"

    def _score(self, trial: RunRecord, accuracy: Mapping[str, float]) -> float:
        if self.split is not None:
            return _accuracy(trial, accuracy, self.split)
        ood = sorted(k for k in trial.metrics if is_ood(k))
        if not ood:
            raise SelectionError(f"task {trial.task!r} has no OOD split to select on")
        return sum(_accuracy(trial, accuracy, k) for k in ood) / len(ood)

    def choose(self, trial: RunRecord) -> EpochChoice:
        return _argmax_epoch(trial, self._score)


@register_rule
class LastEpoch(SelectionRule):
    """The final epoch of each trial; hyperparameters by ID-validation accuracy at that epoch."""

    name = "last-epoch"

    def choose(self, trial: RunRecord) -> EpochChoice:
        epoch, accuracy = trial.epochs()[-1]
        return _choice(trial, epoch, accuracy, _accuracy(trial, accuracy, ID_VAL))


def rule_names() -> list[str]:
    return _RULES.names()


def create_rule(spec: str) -> SelectionRule:
    """A rule from ``name`` or ``name:argument``: ``id-val``, ``last-epoch``, ``oracle`` (mean OOD), ``oracle:ood/<name>``."""
    name, _, arg = spec.partition(":")
    if name not in _RULES:
        raise SelectionError(f"unknown selection rule {spec!r}; choose from {rule_names()} (oracle:ood/<name> too)")
    return _RULES[name](arg or None)
