"""Experiment trackers: finished runs logged to MLflow or TensorBoard, through their own libraries.

``lpft run --track`` and ``lpft sweep --track`` take ``mlflow[:URI]`` or ``tensorboard[:DIR]``
(:func:`create_tracker`), so people see lpft's runs in the tools they already use. A tracker
logs one finished :class:`~lpft.runs.RunRecord` at a time: after :func:`lpft.runs.execute` has
returned (``lpft run``), or after a sweep trial is in the results store (a sweep reads it back
from there, so the Ray engine's trials are logged by the driver too). What a tracker writes is
a copy: :func:`log_safely` turns any tracker error into a warning, so tracking never loses or
fails a run.

Logged per run: tags (task, backbone, method, seed, trial hash), params (the method's settings
and the backbone options, ``backbone.<option>``), the per-epoch history at ``step=epoch``
(``accuracy/<split>``, ``train_loss``...), the final metrics of every split at the selected
epoch (``final/<split>/<metric>``), what the run selected (``selected/<key>``), its timings
(``timings/<key>``), and the run record JSON. mlflow and tensorboard are imported only when a
tracker is created; a missing one is a :class:`~lpft.errors.ConfigError` naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lpft.errors import ConfigError

if TYPE_CHECKING:
    from lpft.runs.record import RunRecord

log = logging.getLogger(__name__)

MLFLOW_DEFAULT = "mlruns"  # a local file store, as MLflow's own default used to be
TENSORBOARD_DEFAULT = "tensorboard-runs"  # not "runs": lpft sweeps keep their results there
_MLFLOW_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-call limits of log_batch
_MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # stores that need SQLAlchemy, not in mlflow-skinny
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")  # characters MLflow refuses in a metric name (an OOD split may have them)


class Tracker(ABC):
    """Where finished runs are logged; :attr:`target` names it in messages."""

    name: str

    @property
    @abstractmethod
    def target(self) -> str:
        """Where the runs go (a tracking URI or a folder)."""

    @abstractmethod
    def log_record(self, record: RunRecord, experiment: str, trial_hash: str | None = None) -> None:
        """Log one finished run under ``experiment`` (a sweep's name, else the task's); may raise."""

    def __str__(self) -> str:
        return f"{self.name} ({self.target})"


def create_tracker(text: str) -> Tracker:
    """The tracker ``--track TEXT`` names: ``mlflow[:URI]`` or ``tensorboard[:DIR]``.

    Checked before any work: an unknown scheme, an empty location or a missing library is a
    :class:`~lpft.errors.ConfigError`.
    """
    scheme, colon, location = text.partition(":")
    if scheme not in ("mlflow", "tensorboard"):
        raise ConfigError(f"--track {text}: unknown tracker {scheme!r}; use mlflow[:URI] or tensorboard[:DIR]")
    if colon and not location:
        raise ConfigError(f"--track {text}: nothing after ':'; give a tracking URI or folder, or drop the ':'")
    if scheme == "mlflow":
        return MlflowTracker(location or MLFLOW_DEFAULT)
    return TensorBoardTracker(location or TENSORBOARD_DEFAULT)


def log_safely(tracker: Tracker, record: RunRecord, experiment: str, trial_hash: str | None = None) -> bool:
    """Log ``record``; an error of the tracker is a warning, never the run's failure. True when it was logged."""
    try:
        tracker.log_record(record, experiment, trial_hash)
    except Exception as exc:  # noqa: BLE001  (any tracker error: the run is already done and stored)
        log.warning("tracker %s could not log the %s run of %s: %s: %s; the run itself is unaffected",
                    tracker, record.method, experiment, type(exc).__name__, exc)
        log.debug("tracker error", exc_info=True)
        return False
    return True


def _require(module: str, extra: str, what: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"--track {extra} needs {what}, which is not installed: pip install 'lpft[{extra}]'") from exc


def run_name(record: RunRecord, trial_hash: str | None) -> str:
    """``<method>-<trial hash, 12 digits>`` for a sweep trial, else ``<method>-<local time>``."""
    suffix = trial_hash[:12] if trial_hash else datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{record.method}-{suffix}"


def tags(record: RunRecord, trial_hash: str | None) -> dict[str, str]:
    found = {"task": record.task, "backbone": record.backbone, "method": record.method, "seed": str(record.seed)}
    return {**found, "trial_hash": trial_hash} if trial_hash else found


def params(record: RunRecord) -> dict[str, Any]:
    """The method's settings, and the backbone options as ``backbone.<option>``."""
    return {**record.hyperparameters, **{f"backbone.{k}": v for k, v in record.backbone_options.items()}}


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def epoch_metrics(record: RunRecord) -> Iterator[tuple[str, float, int]]:
    """``(name, value, epoch)`` of every number in the per-epoch history; a mapping's entries as ``<key>/<entry>``.

    History rows without an epoch (LP's search over C) and missing values (epoch 0 has no
    training loss) are left out.
    """
    for row in record.history:
        if _number(row.get("epoch")) is None:
            continue
        for key, value in row.items():
            entries = value.items() if isinstance(value, Mapping) else [(None, value)]
            for entry, v in entries:
                if key != "epoch" and (number := _number(v)) is not None:
                    yield (key if entry is None else f"{key}/{entry}"), number, int(row["epoch"])


def final_metrics(record: RunRecord) -> dict[str, float]:
    """Each split's metrics as ``final/<split>/<metric>``, and the selection and timings (numbers only)."""
    out = {f"final/{split}/{name}": number for split, values in record.metrics.items()
           for name, v in values.items() if (number := _number(v)) is not None}
    for group, values in (("selected", record.selected), ("timings", record.timings)):
        out.update({f"{group}/{k}": number for k, v in values.items() if (number := _number(v)) is not None})
    return out


def final_step(record: RunRecord) -> int:
    """The step final metrics are logged at: the selected epoch (they were computed there), else 0."""
    epoch = _number(record.selected.get("epoch"))
    return 0 if epoch is None else int(epoch)


class MlflowTracker(Tracker):
    """One MLflow run per lpft run, in an experiment per sweep (or task), through ``MlflowClient``.

    ``uri`` is a tracking URI (``http://...``, ``sqlite:///...``, ``databricks``) or a folder,
    which becomes a local file store. MLflow 3 refuses file stores unless
    ``MLFLOW_ALLOW_FILE_STORE`` is true; asking lpft for one is that opt-in, so it is set
    (unless already set) for this process. A database store needs the full ``mlflow``
    package (``lpft[mlflow]`` installs ``mlflow-skinny``), checked here rather than after a run.
    """

    name = "mlflow"

    def __init__(self, uri: str) -> None:
        self.uri = uri if urlparse(uri).scheme or uri == "databricks" else Path(uri).resolve().as_uri()
        _require("mlflow", "mlflow", "MLflow")
        database = urlparse(self.uri).scheme.partition("+")[0] in _MLFLOW_DATABASES
        if database and not all(importlib.util.find_spec(m) for m in ("sqlalchemy", "alembic")):
            raise ConfigError(f"--track mlflow:{uri}: MLflow's database stores need the full MLflow package "
                              "(lpft[mlflow] installs mlflow-skinny): pip install mlflow")
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client: Any = None

    @property
    def target(self) -> str:
        return self.uri

    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        """The experiment called ``name``, created when missing (another process may create it meanwhile)."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_record(self, record: RunRecord, experiment: str, trial_hash: str | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client()
        run = client.create_run(self.experiment_id(experiment), run_name=run_name(record, trial_hash))
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        step = final_step(record)
        batch = {
            "metrics": [Metric(_MLFLOW_UNSAFE.sub("_", k), v, now, epoch) for k, v, epoch in epoch_metrics(record)]
            + [Metric(_MLFLOW_UNSAFE.sub("_", k), v, now, step) for k, v in final_metrics(record).items()],
            "params": [Param(k, str(v)) for k, v in params(record).items()],
            "tags": [RunTag(k, v) for k, v in tags(record, trial_hash).items()],
        }
        try:
            for kind, items in batch.items():
                size = _MLFLOW_BATCH[kind]
                for start in range(0, len(items), size):
                    client.log_batch(run_id, **{kind: items[start:start + size]})
            client.log_dict(run_id, record.to_json(), "record.json")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        log.info("logged the %s run to MLflow experiment %r at %s (run %s)", record.method, experiment, self.uri,
                 run_id)


class TensorBoardTracker(Tracker):
    """One event-file folder per lpft run, ``DIR/<sweep or task>/<method>-<trial hash or time>``.

    Scalars per epoch and the final metrics, the settings through the HParams plugin (the
    final metrics are its metric columns), and ``record.json`` beside the event file.
    """

    name = "tensorboard"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        _require("torch.utils.tensorboard", "tensorboard", "TensorBoard")

    @property
    def target(self) -> str:
        return str(self.folder)

    def run_folder(self, record: RunRecord, experiment: str, trial_hash: str | None) -> Path:
        """A new folder for this run: a run logged again (or in the same second) gets ``-2``, ``-3``..."""
        base = self.folder / _safe_name(experiment) / run_name(record, trial_hash)
        folder, n = base, 1
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        return folder

    def log_record(self, record: RunRecord, experiment: str, trial_hash: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = self.run_folder(record, experiment, trial_hash)
        final = final_metrics(record)
        shown = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                 for k, v in {**params(record), **tags(record, trial_hash)}.items()}
        with SummaryWriter(log_dir=str(folder)) as writer:
            for key, value, epoch in epoch_metrics(record):
                writer.add_scalar(key, value, epoch)
            step = final_step(record)
            for key, value in final.items():
                writer.add_scalar(key, value, step)
            for summary in hparams(shown, final):
                writer.file_writer.add_summary(summary)
        (folder / "record.json").write_text(json.dumps(record.to_json(), indent=2))
        log.info("logged the %s run for TensorBoard to %s", record.method, folder)


def _safe_name(name: str) -> str:
    """``name`` as one folder name: anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``."""
    return re.sub(r"[^\w.-]+", "_", name).strip(".") or "_"
