"""Sweeps: a YAML spec -> trials -> the results database, resumable after any crash.

A *trial* is (task, backbone, backbone options, method, hyperparameters, seed). Its config
is resolved completely (every FinetuneConfig field written out) and identified by the
sha256 of its canonical JSON, so re-running a spec finds the trials that already finished
and runs only the rest. :func:`run_trial` runs one resolved trial and writes it to the
store; it is a plain top-level function of picklable arguments so a distributed dispatcher
can call it on workers. :func:`run_sweep` is the serial loop over pending trials, seed-major.

Spec (all keys but ``task`` optional; defaults are the paper's protocol, DESIGN.md §2)::

    name: my-sweep                  # default: the spec file's stem
    task: emoji-styles              # a bundled benchmark or a task YAML (relative to this file)
    task_options: {}                # options of a bundled benchmark, e.g. digits: {n_train: 1000}
    backbones:                      # or ``backbone: NAME`` plus ``backbone_options: {...}``
      - {name: efficientnet-lite0, image_size: 64}
    seeds: [0, 1, 2]
    finetune: {epochs: 20}          # shared by every fine-tuning method, overridable per method
    methods:
      lp: {C: auto}                 # "auto": the probe's own C path, chosen on id_val; or a list of C
      ft: {lr: [3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]}
      lpft: {lr: [3.0e-6, 1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3]}

A list value in a method's grid is swept (cartesian product); any FinetuneConfig field
but ``seed`` may be gridded. ``batch_size: auto`` (the default) is the paper's 64, made
smaller for small tasks so that an epoch has at least 10 steps.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import platform
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

import lpft
from lpft.backbones import Backbone, create_backbone
from lpft.data import Task, load_task
from lpft.evaluation import evaluate
from lpft.experiment import resolve_device, run_method
from lpft.features import cached_features
from lpft.finetune import FinetuneConfig
from lpft.methods import create_method, method_names
from lpft.probe import LinearProbe
from lpft.store import Store

log = logging.getLogger(__name__)

PAPER_SEEDS: tuple[int, ...] = (0, 1, 2)
# FT: 6 learning rates 3e-5..1e-2; LP-FT: the same grid 10x lower (the paper's LP-FT grids were 10-100x lower).
PAPER_GRIDS: dict[str, dict[str, Any]] = {
    "lp": {"C": "auto"},
    "ft": {"lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
    "lpft": {"lr": [3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3]},
}
PAPER_FINETUNE: dict[str, Any] = {
    "epochs": 20, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "batch_size": "auto", "bn_mode": "frozen",
}
FINETUNE_KEYS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig)) - {"seed"}
SPEC_KEYS = frozenset({"name", "task", "task_options", "backbone", "backbone_options", "backbones", "seeds",
                       "finetune", "methods", "device"})


class SpecError(ValueError):
    """A sweep spec is invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what to run, before expansion into trials."""

    name: str
    task: str
    task_options: dict[str, Any]
    backbones: tuple[BackboneSpec, ...]
    seeds: tuple[int, ...]
    methods: dict[str, dict[str, Any]]  # method -> grid (values may be lists)
    device: str = "auto"


@dataclass(frozen=True)
class Trial:
    """One resolved trial; ``config`` is plain JSON data so the trial pickles and hashes stably."""

    config: dict[str, Any]

    @functools.cached_property
    def hash(self) -> str:
        return config_hash(self.config)

    @property
    def label(self) -> str:
        c = self.config
        hp = {k: v for k, v in c["hyperparameters"].items() if k in ("C", "lr", "epochs", "seed")}
        return f"{c['method']} {c['backbone']} " + " ".join(f"{k}={v}" for k, v in hp.items())


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved trial config."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------- the spec
def load_spec(path: Path | str) -> SweepSpec:
    """Read and validate a sweep spec YAML; task paths are resolved relative to the spec file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"cannot read sweep spec {path}: {e}") from e
    return parse_spec(raw, default_name=path.stem, base_dir=path.parent)


def parse_spec(raw: Any, default_name: str = "sweep", base_dir: Path | None = None) -> SweepSpec:
    """Validate a spec given as a mapping (what ``yaml.safe_load`` returns); see the module docstring."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"a sweep spec is a mapping with at least 'task', got {type(raw).__name__}")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)} in sweep spec; allowed: {sorted(SPEC_KEYS)}")
    if not isinstance(raw.get("task"), str) or not raw["task"]:
        raise SpecError("sweep spec needs 'task': a bundled benchmark name or the path of a task YAML")
    task = raw["task"]
    if base_dir is not None and Path(task).suffix in {".yaml", ".yml"}:
        task = str((base_dir / task).resolve())
    task_options = _mapping(raw.get("task_options", {}), "task_options")

    if "backbones" in raw and ("backbone" in raw or "backbone_options" in raw):
        raise SpecError("give either 'backbones' (a list) or 'backbone' (+ 'backbone_options'), not both")
    if "backbones" in raw:
        entries = raw["backbones"]
        if not isinstance(entries, list) or not entries:
            raise SpecError("'backbones' must be a non-empty list of names or {name: ..., <option>: ...} mappings")
    elif "backbone" in raw:
        entries = [{"name": raw["backbone"], **_mapping(raw.get("backbone_options", {}), "backbone_options")}]
    else:
        raise SpecError("sweep spec needs 'backbone' (or 'backbones'), e.g. efficientnet-lite0")
    backbones = tuple(_backbone(e, i) for i, e in enumerate(entries))

    seeds = raw.get("seeds", list(PAPER_SEEDS))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"'seeds' has duplicates: {seeds}")

    shared = _mapping(raw.get("finetune", {}), "finetune")
    _check_finetune_keys(shared, "finetune")
    methods_raw = raw.get("methods", {m: {} for m in PAPER_GRIDS})
    if isinstance(methods_raw, list):
        methods_raw = {m: {} for m in methods_raw}
    methods_raw = _mapping(methods_raw, "methods")
    if not methods_raw:
        raise SpecError("'methods' is empty; list at least one of " + ", ".join(method_names()))
    methods = {}
    for method, grid in methods_raw.items():
        if method not in method_names():
            raise SpecError(f"unknown method {method!r} under 'methods'; choose from {method_names()}")
        methods[method] = _method_grid(method, _mapping(grid or {}, f"methods.{method}"), shared)

    device = raw.get("device", "auto")
    if not isinstance(device, str):
        raise SpecError(f"'device' must be a string such as auto, cpu or cuda, got {device!r}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise SpecError(f"'name' must be a non-empty string, got {name!r}")
    return SweepSpec(name, task, task_options, backbones, tuple(seeds), methods, device)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"'{key}' must be a mapping, got {value!r}")
    return dict(value)


def _backbone(entry: Any, index: int) -> BackboneSpec:
    if isinstance(entry, str):
        return BackboneSpec(entry)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise SpecError(f"backbones[{index}] must be a name or a mapping with 'name', got {entry!r}")
    options = {k: v for k, v in entry.items() if k != "name"}
    return BackboneSpec(entry["name"], options)


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; read such strings as the numbers they mean."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_finetune_keys(grid: Mapping[str, Any], where: str) -> None:
    unknown = set(grid) - FINETUNE_KEYS
    if "seed" in grid:
        raise SpecError(f"'{where}' sets 'seed'; seeds are given once, by the top-level 'seeds' list")
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)} in '{where}'; allowed: {sorted(FINETUNE_KEYS)}")


def _method_grid(method: str, grid: dict[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    """The method's grid with the paper's defaults filled in; LP takes only ``C``."""
    where = f"methods.{method}"
    if method == "lp":
        if set(grid) - {"C"}:
            raise SpecError(f"'{where}' takes only 'C' (auto or a list of positive values), got {sorted(grid)}")
        C = grid.get("C", "auto")
        values = [_number(c) for c in (C if isinstance(C, list) else [C])]
        if C != "auto" and not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in values):
            raise SpecError(f"'{where}.C' must be 'auto' or a list of positive numbers, got {C!r}")
        return {"C": C if C == "auto" else [float(c) for c in values]}
    _check_finetune_keys(grid, where)
    merged = {**PAPER_FINETUNE, **PAPER_GRIDS.get(method, PAPER_GRIDS["ft"]), **shared, **grid}
    merged = {k: [_number(x) for x in v] if isinstance(v, list) else _number(v) for k, v in merged.items()}
    for key, value in merged.items():
        for v in value if isinstance(value, list) else [value]:
            if key == "batch_size" and v == "auto":
                continue
            try:
                FinetuneConfig(**{key: v})
            except (TypeError, ValueError) as e:
                raise SpecError(f"'{where}.{key}': {e}") from e
        if isinstance(value, list) and not value:
            raise SpecError(f"'{where}.{key}' is an empty list")
    return merged


# ---------------------------------------------------------------------- expansion
def auto_batch_size(n_train: int) -> int:
    """The paper's 64, smaller for small tasks so an epoch has at least 10 steps (never below 8)."""
    return max(8, min(64, n_train // 10))


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the spec, resolved, in a stable seed-major order (seed, backbone, method, grid).

    Seed-major so that a sweep stopped early already covers every setting with its first
    seeds. LP depends only on ``C`` and the seed, so an lr/epoch grid never multiplies LP trials.
    """
    n_train: int | None = None
    trials: list[Trial] = []
    for seed, bb in itertools.product(spec.seeds, spec.backbones):
        for method, grid in spec.methods.items():
            keys = sorted(grid)
            for values in itertools.product(*[grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]):
                point = dict(zip(keys, values))
                if point.get("batch_size") == "auto":
                    if n_train is None:
                        n_train = len(load_cached_task(spec.task, _canonical(spec.task_options)).train)
                    point["batch_size"] = auto_batch_size(n_train)
                config = FinetuneConfig(**{k: v for k, v in point.items() if k in FINETUNE_KEYS}, seed=seed)
                # What the method reads of the config (LP: the seed only), plus its own grid keys (LP's C)
                own = {k: v for k, v in point.items() if k not in FINETUNE_KEYS}
                hyper = {**own, **create_method(method).hyperparameters(config)}
                trials.append(Trial({
                    "task": spec.task, "task_options": spec.task_options, "backbone": bb.name,
                    "backbone_options": bb.options, "method": method, "hyperparameters": hyper,
                }))
    return trials


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------- running
@functools.lru_cache(maxsize=2)
def load_cached_task(task: str, options_json: str) -> Task:
    """Load a task once per process (benchmarks render or read their cache on load)."""
    return load_task(task, **json.loads(options_json))


@functools.lru_cache(maxsize=2)
def _cached_backbone(name: str, options_json: str) -> Backbone:
    # methods must not modify the backbone they are given, so one instance serves every trial
    return create_backbone(name, **json.loads(options_json))


def environment(device: torch.device) -> dict[str, str]:
    """Package versions and device, recorded with every trial."""
    return {"lpft": lpft.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(device)}


def run_trial(trial: Trial, db_path: str | Path, device: str = "auto") -> str:
    """Run one resolved trial and write it to the store; returns its final status.

    The trial is marked ``running`` before any work and ``finished`` together with all of
    its results in one transaction, so a crash leaves it unfinished, never half-written.
    An exception is recorded as ``failed`` (with its traceback) and not raised, so one bad
    trial does not stop a sweep.
    """
    c = trial.config
    dev = resolve_device(device)
    with Store(db_path) as store:
        store.mark_running(trial.hash)
        start = time.perf_counter()
        try:
            task = load_cached_task(c["task"], _canonical(c["task_options"]))
            backbone = _cached_backbone(c["backbone"], _canonical(c["backbone_options"]))
            if backbone.modality != task.modality:
                raise ValueError(f"backbone {c['backbone']!r} reads {backbone.modality}, task {task.name!r} is {task.modality}")
            loaded = time.perf_counter()
            selected, metrics, history, fit_seconds = _fit(task, backbone, c["method"], c["hyperparameters"], dev)
        except Exception:  # noqa: BLE001  (recorded in the store and logged; the sweep goes on)
            log.exception("trial %s failed", trial.label)
            store.mark_failed(trial.hash, traceback.format_exc())
            return "failed"
        timings = {"load_seconds": round(loaded - start, 3), "fit_seconds": round(fit_seconds, 3),
                   "trial_seconds": round(time.perf_counter() - start, 3)}
        store.mark_finished(trial.hash, task_name=task.name, selected=selected, metrics=metrics, history=history, timings=timings,
                            environment=environment(dev))
    return "finished"


def _fit(
    task: Task, backbone: Backbone, method: str, hyper: Mapping[str, Any], device: torch.device
) -> tuple[dict, dict, list, float]:
    """(selected, metrics, history, fit seconds) of one trial."""
    if method == "lp" and hyper["C"] != "auto":
        return _fit_probe_at(task, backbone, float(hyper["C"]), device)
    config = FinetuneConfig(**{k: v for k, v in hyper.items() if k in FINETUNE_KEYS or k == "seed"})
    record, _ = run_method(task, backbone, method, config, device)
    return record.selected, record.metrics, record.history, record.timings["fit_seconds"]


def _fit_probe_at(task: Task, backbone: Backbone, C: float, device: torch.device) -> tuple[dict, dict, list, float]:
    """LP at one given C (a point of an explicit C grid), so selection rules choose C across trials."""
    start = time.perf_counter()
    backbone.to(device)
    feats = {key: cached_features(backbone, split, device) for key, split in task.splits()}
    probe = LinearProbe([C], device=str(device)).fit(
        feats["train"], task.train.labels, feats["id_val"], task.id_val.labels, n_classes=task.num_classes
    )
    logits = {key: feats[key] @ probe.coef_.T + probe.intercept_ for key, _ in task.eval_splits()}
    fit_seconds = time.perf_counter() - start
    return {"C": C}, evaluate(task, logits), list(probe.path_), fit_seconds


@dataclass
class SweepSummary:
    """What one invocation of :func:`run_sweep` did."""

    total: int
    skipped: int  # already finished before this invocation
    finished: int
    failed: int
    seconds: float


def register(spec: SweepSpec, trials: Sequence[Trial], store: Store) -> list[Trial]:
    """Record every trial in the store; return those not finished yet (pending, failed or interrupted)."""
    pending = []
    for trial in trials:
        store.register(spec.name, trial.hash, trial.config)
        if store.status(trial.hash) != "finished":
            pending.append(trial)
    return pending


def run_sweep(spec: SweepSpec, db_path: str | Path, device: str | None = None, progress: bool = True) -> SweepSummary:
    """Run the spec's unfinished trials one after another, resuming where a previous run stopped."""
    start = time.perf_counter()
    trials = expand(spec)
    with Store(db_path) as store:
        pending = register(spec, trials, store)
    log.info("sweep %s: %d trials, %d already finished, %d to run", spec.name, len(trials),
             len(trials) - len(pending), len(pending))
    finished = failed = 0
    bar = tqdm(pending, desc=f"sweep {spec.name}", unit="trial", disable=not progress)
    for trial in bar:
        bar.set_postfix_str(trial.label)
        if run_trial(trial, db_path, device or spec.device) == "finished":
            finished += 1
        else:
            failed += 1
    bar.close()
    return SweepSummary(len(trials), len(trials) - len(pending), finished, failed, time.perf_counter() - start)
