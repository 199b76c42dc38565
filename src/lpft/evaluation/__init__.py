"""Scores every evaluated split the same way: accuracy and calibration, before and after
temperature scaling fitted on ID validation only (never on a test or OOD split)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lpft.data.splits import ID_VAL
from lpft.data.task import Task
from lpft.evaluation.metrics import calibration_report, fit_temperature


def evaluate(task: Task, logits: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{split_key: {"accuracy", "ece", "nll", "brier", "temperature", "ece_ts", ...}}`` per eval split."""
    missing = [k for k, _ in task.eval_splits() if k not in logits]
    if missing:
        raise ValueError(f"no logits for splits {missing}")
    temperature = fit_temperature(logits[ID_VAL], task.id_val.labels)
    return {key: calibration_report(logits[key], split.labels, temperature) for key, split in task.eval_splits()}
