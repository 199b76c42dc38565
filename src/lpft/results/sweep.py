"""Sweeps: a spec -> trials -> the results database, resumable after any crash.

A *trial* is one :class:`~lpft.runs.RunSpec` (task, backbone and options, method, every
setting, seed): resolved completely and identified by the sha256 of its canonical JSON, so
re-running a spec finds the trials that already finished and runs only the rest.
:func:`run_trial` claims one trial in the store, runs it through the one run pipeline
(:func:`lpft.runs.execute`) and records it; it is a plain top-level function of picklable
arguments so a distributed dispatcher can call it on workers. :func:`run_sweep` is the
serial loop over pending trials, seed-major. Nothing here names a method: each method's
grid comes from its config (:mod:`lpft.results.spec`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import shutil
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lpft.methods import method_config
from lpft.progress import progress_disabled
from lpft.results.spec import SweepSpec
from lpft.results.store import Store
from lpft.runs import RunSpec, execute
from lpft.runs.pipeline import canonical, load_task_once

if TYPE_CHECKING:
    from lpft.runs.tracking import Tracker

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Trial:
    """One resolved trial; ``config`` is its run spec as plain JSON data, so it pickles and hashes stably."""

    config: dict[str, Any]

    @functools.cached_property
    def hash(self) -> str:
        return config_hash(self.config)

    @property
    def spec(self) -> RunSpec:
        return RunSpec.from_json(self.config)

    @property
    def label(self) -> str:
        c = self.config
        hp = {k: v for k, v in c["hyperparameters"].items() if k in ("C", "lr", "epochs", "seed")}
        return f"{c['method']} {c['backbone']} " + " ".join(f"{k}={v}" for k, v in hp.items())


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved trial config."""
    return hashlib.sha256(canonical(config).encode()).hexdigest()


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the spec, resolved, in a stable seed-major order (seed, backbone, method, grid).

    Seed-major so that a sweep stopped early already covers every setting with its first
    seeds. Settings a method does not have never multiply its trials (LP has no ``lr``).
    """
    trials: list[Trial] = []
    for seed, bb in itertools.product(spec.seeds, spec.backbones):
        for method, grid in spec.methods.items():
            keys = sorted(grid)
            for values in itertools.product(*[grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]):
                config = method_config(method, {**dict(zip(keys, values)), "seed": seed})
                if config.needs_task_size():
                    config = config.resolve(len(load_task_once(spec.task, spec.task_options).train))
                run = RunSpec(spec.task, bb.name, method, config.to_dict(), spec.task_options, bb.options)
                trials.append(Trial(run.to_json()))
    return trials


def run_trial(trial: Trial, db_path: str | Path, device: str = "auto", checkpoint: str | Path | None = None,
              keep_runs: str | Path | None = None) -> str:
    """Claim one trial, run it and write it to the store; returns ``finished``, ``failed`` or ``skipped``.

    A trial that is finished, or held by another live process, is skipped. The trial runs
    under this process's lease and is marked ``finished`` together with all of its results
    in one transaction, so a crash leaves it unfinished, never half-written. An exception
    is recorded as ``failed`` (with its traceback) and not raised, so one bad trial does not
    stop a sweep. With ``checkpoint``, the trial saves its training state after every epoch
    to its own subfolder ``checkpoint/<trial hash>``, so a killed sweep resumes its unfinished
    trial mid-way; the subfolder is deleted once the trial's result is stored. With
    ``keep_runs``, the finished run is saved as ``keep_runs/<trial hash>`` (weights, logits,
    record: :func:`lpft.runs.artifacts.save_run`), what model soups are made from.
    """
    folder = None if checkpoint is None else Path(checkpoint) / trial.hash
    save = None if keep_runs is None else Path(keep_runs) / trial.hash
    with Store(db_path) as store:
        if not store.claim(trial.hash):
            return "skipped"
        with store.lease(trial.hash):
            try:
                record = execute(trial.spec, device, checkpoint=folder, save=save, overwrite=True)
            except Exception:  # noqa: BLE001  (recorded in the store and logged; the sweep goes on)
                log.exception("trial %s failed", trial.label)
                store.mark_failed(trial.hash, traceback.format_exc())
                return "failed"
            store.mark_finished(trial.hash, task_name=record.task, selected=record.selected, metrics=record.metrics,
                                history=record.history, timings=record.timings, environment=record.environment,
                                diagnostics=record.diagnostics)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)  # a leftover costs only disk: the store says finished
    return "finished"


@dataclass
class SweepSummary:
    """What one invocation of :func:`run_sweep` did."""

    total: int
    skipped: int  # already finished before this invocation, or held by another process
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


def track_trial(tracker: Tracker, db_path: str | Path, sweep: str, config_hash: str) -> None:
    """Log a finished trial, as the store holds it, to ``tracker`` (experiment ``sweep``); a tracker error is a warning.

    Read back from the store so that both engines log what the report will show, from the
    process that drives the sweep (a Ray worker's tracker would write on its own node). A trial
    whose lease another process took over is that process's to log.
    """
    from lpft.results.report import stored_record
    from lpft.runs.tracking import log_safely

    with Store(db_path, readonly=True) as store:
        stored = store.trial(config_hash)
    if stored is not None and stored.status == "finished":
        log_safely(tracker, stored_record(stored), sweep, config_hash)


def run_sweep(spec: SweepSpec, db_path: str | Path, device: str | None = None, progress: bool = True,
              checkpoint: str | Path | None = None, tracker: Tracker | None = None,
              keep_runs: str | Path | None = None) -> SweepSummary:
    """Run the spec's unfinished trials one after another, resuming where a previous run stopped.

    With ``checkpoint`` (a folder), each trial checkpoints its epochs there (:func:`run_trial`),
    so an interrupted trial resumes mid-way rather than from its start. With ``tracker``, each
    trial this call finishes is also logged there (:func:`track_trial`), under the sweep's name.
    """
    start = time.perf_counter()
    trials = expand(spec)
    with Store(db_path) as store:
        pending = register(spec, trials, store)
    log.info("sweep %s: %d trials, %d already finished, %d to run", spec.name, len(trials),
             len(trials) - len(pending), len(pending))
    outcomes = {"finished": 0, "failed": 0, "skipped": 0}
    bar = tqdm(pending, desc=f"sweep {spec.name}", unit="trial", disable=progress_disabled(progress))
    for trial in bar:
        bar.set_postfix_str(trial.label)
        status = run_trial(trial, db_path, device or spec.device, checkpoint, keep_runs)
        outcomes[status] += 1
        if tracker is not None and status == "finished":
            track_trial(tracker, db_path, spec.name, trial.hash)
    bar.close()
    return SweepSummary(len(trials), len(trials) - len(pending) + outcomes["skipped"], outcomes["finished"],
                        outcomes["failed"], time.perf_counter() - start)
