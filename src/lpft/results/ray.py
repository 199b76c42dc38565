"""Sweeps across machines on Ray: every pending trial runs as a Ray task that writes its own row.

The results database stays the single source of truth. The driver registers the spec's
trials (as :func:`lpft.results.sweep.run_sweep` does) and submits one task per unfinished trial;
each task calls :func:`lpft.results.sweep.run_trial`, which claims, runs and records its trial in
the store's own transactions. The driver keeps no results of its own, so a sweep killed at
any point resumes by running it again, with Ray or serially: finished trials are skipped
and interrupted ones (left ``running``) run again.

Requirements: ``pip install 'lpft[ray]'``; the database path must be on a filesystem every
Ray node can reach (SQLite's locking needs a local or well-behaved shared filesystem, see
docs/scale.md), and every node needs lpft and the task's data.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lpft.progress import progress_disabled
from lpft.results.store import Store
from lpft.results.spec import SweepSpec
from lpft.results.sweep import SweepSummary, expand, register, run_trial, track_trial

if TYPE_CHECKING:
    from lpft.runs.tracking import Tracker

log = logging.getLogger(__name__)


def run_sweep_ray(
    spec: SweepSpec,
    db_path: str | Path,
    device: str | None = None,
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    progress: bool = True,
    init_options: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    tracker: Tracker | None = None,
    keep_runs: str | Path | None = None,
) -> SweepSummary:
    """Run the spec's unfinished trials as Ray tasks; returns the same summary as the serial loop.

    ``address`` joins a running cluster (``"auto"``, ``"ray://host:10001"``); without it and
    without an initialised Ray, a local instance is started (``init_options`` go to
    ``ray.init``). ``cpus_per_trial``/``gpus_per_trial`` are each task's resource request.
    ``checkpoint`` is a folder every worker reaches where trials checkpoint their epochs
    (:func:`~lpft.results.sweep.run_trial`), and ``keep_runs`` one where each finished trial saves
    its run (what ``lpft soup`` averages). With ``tracker``, this driver logs each trial that
    finishes (:func:`~lpft.results.sweep.track_trial`), so the logs land where the sweep was started.
    """
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("the Ray engine needs the optional extra: pip install 'lpft[ray]'") from exc
    start = time.perf_counter()
    db_path = Path(db_path).resolve()  # workers may run elsewhere: hand them an absolute path
    trials = expand(spec)
    with Store(db_path) as store:
        pending = register(spec, trials, store)
    log.info("sweep %s on Ray: %d trials, %d already finished, %d to run", spec.name, len(trials),
             len(trials) - len(pending), len(pending))
    if pending and not ray.is_initialized():
        ray.init(address=address, **(init_options or {}))
    task = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)(run_trial)
    folder, keep = (None if path is None else str(Path(path).resolve()) for path in (checkpoint, keep_runs))
    hashes = {task.remote(trial, str(db_path), device or spec.device, folder, keep): trial.hash for trial in pending}
    waiting = list(hashes)
    outcomes = {"finished": 0, "failed": 0, "skipped": 0}
    bar = tqdm(total=len(waiting), desc=f"sweep {spec.name} (ray)", unit="trial", disable=progress_disabled(progress))
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        try:
            status = ray.get(done[0])
        except ray.exceptions.RayError:  # the worker died (e.g. out of memory): the store still says running
            log.exception("a Ray task died; its trial stays unfinished and runs again on resume")
            status = "failed"
        outcomes[status] += 1
        if tracker is not None and status == "finished":
            track_trial(tracker, db_path, spec.name, hashes[done[0]])
        bar.update(1)
    bar.close()
    return SweepSummary(len(trials), len(trials) - len(pending) + outcomes["skipped"], outcomes["finished"],
                        outcomes["failed"], time.perf_counter() - start)
