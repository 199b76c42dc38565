"""The one shape a finished run has, from the run to the store to the report."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import lpft


def backbone_label(name: str, options: Mapping[str, Any]) -> str:
    """``efficientnet-lite0 (image_size=64)``: the backbone and the options that change it."""
    shown = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if v is not None)
    return f"{name} ({shown})" if shown else name


def environment(device: torch.device | str) -> dict[str, str]:
    """Package versions, device, command line and start time, recorded with every run."""
    return {"lpft": lpft.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(device), "command": shlex.join(sys.argv),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def setting_key(hyperparameters: Mapping[str, Any]) -> str:
    """Hyperparameters but the seed, as canonical JSON: what trials differing only in seed share."""
    return json.dumps({k: v for k, v in hyperparameters.items() if k != "seed"}, sort_keys=True)


@dataclass
class RunRecord:
    """The outcome of one run: what ran (task, backbone and its options, method and every
    setting, seed included), what it chose on ID validation, its metrics on every evaluated
    split, its per-epoch history, its cost, and what the method measured on the way.

    Selection rules and reports read records directly: trials that differ only in the seed
    share a :attr:`setting`, and :meth:`epochs` gives the per-epoch accuracies rules choose from.
    """

    task: str
    backbone: str
    method: str
    hyperparameters: dict[str, Any]
    selected: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)  # the run spec that repeats this run (lpft.runs.RunSpec)

    @property
    def seed(self) -> int:
        return int(self.hyperparameters.get("seed", 0))

    @property
    def setting(self) -> str:
        """The hyperparameters but the seed, as canonical JSON: trials that differ only in seed share it."""
        return setting_key(self.hyperparameters)

    @property
    def backbone_label(self) -> str:
        return backbone_label(self.backbone, self.backbone_options)

    def epochs(self) -> list[tuple[int | None, dict[str, float]]]:
        """``(epoch, {split: accuracy})`` per epoch; one ``(None, final accuracies)`` when there are no epochs.

        When only ID validation was scored every epoch, the epoch the run selected is
        completed from its final metrics (they were computed at that epoch).
        """
        final = {split: m["accuracy"] for split, m in self.metrics.items()}
        rows = [h for h in self.history if "epoch" in h and isinstance(h.get("accuracy"), Mapping)]
        if not rows:
            return [(None, final)]
        out = []
        for h in rows:
            accuracy = dict(h["accuracy"])
            if h["epoch"] == self.selected.get("epoch"):
                accuracy = {**final, **accuracy}
            out.append((int(h["epoch"]), accuracy))
        return out

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record from :meth:`to_json` output; fields added since it was written take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
