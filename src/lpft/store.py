"""The results database: one SQLite row per trial, written so a crash never corrupts it.

A trial moves ``pending -> running -> finished`` (or ``failed``). Each move is one
transaction, and the results of a trial (metrics, per-epoch history, timings, versions)
are written together with its ``finished`` status in the same transaction, so a process
killed at any moment leaves either a finished trial with all of its results or an
unfinished one that the next run of the sweep simply repeats. The database runs in WAL
mode with ``synchronous=FULL``: readers (``lpft report``) never block the writer, and a
committed trial survives a ``kill -9``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "finished", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    config_hash  TEXT PRIMARY KEY,
    sweep        TEXT NOT NULL,
    task         TEXT NOT NULL,             -- the task's own name once run (config holds the spec's path)
    backbone     TEXT NOT NULL,
    method       TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    config       TEXT NOT NULL,             -- the resolved trial config, canonical JSON
    status       TEXT NOT NULL CHECK (status IN ('pending', 'running', 'finished', 'failed')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    worker       TEXT,                      -- host:pid of the last process that ran it
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    selected     TEXT,                      -- JSON: what the method chose on id_val (epoch, C, ...)
    metrics      TEXT,                      -- JSON: {split: {accuracy, ece, nll, brier, ...}}
    history      TEXT,                      -- JSON: per-epoch records (FT, LP-FT) or the probe's C path (LP)
    timings      TEXT,                      -- JSON: seconds
    environment  TEXT,                      -- JSON: package versions, device
    error        TEXT
);
CREATE INDEX IF NOT EXISTS trials_by_status ON trials (status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoredTrial:
    """One row of the ``trials`` table, JSON columns decoded."""

    config_hash: str
    sweep: str
    task: str
    backbone: str
    method: str
    seed: int
    config: dict[str, Any]
    status: str
    attempts: int
    selected: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    history: list[dict]
    timings: dict[str, float]
    environment: dict[str, str]
    error: str | None


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store:
    """A trial database in one SQLite file; safe to open from several processes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write below opens its own.
        self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS), so concurrent opens are safe
        with self._transaction():
            self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            found = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()["value"]
        if int(found) != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has results schema {found}, this lpft writes {SCHEMA_VERSION}; use a new database file"
            )

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` takes the write lock up front, so two writers never deadlock."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # ------------------------------------------------------------------ writing
    def register(self, sweep: str, config_hash: str, config: Mapping[str, Any]) -> None:
        """Add a trial as ``pending`` unless it is already known (its status is then kept)."""
        with self._transaction():
            self._conn.execute(
                "INSERT OR IGNORE INTO trials (config_hash, sweep, task, backbone, method, seed, config, status, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (config_hash, sweep, config["task"], config["backbone"], config["method"],
                 int(config["hyperparameters"]["seed"]), _dumps(config), time.time()),
            )

    def mark_running(self, config_hash: str) -> None:
        """Claim a registered trial for this process; counts the attempt."""
        with self._transaction():
            cur = self._conn.execute(
                "UPDATE trials SET status='running', attempts=attempts+1, worker=?, started_at=?, finished_at=NULL, "
                "error=NULL WHERE config_hash=?",
                (f"{socket.gethostname()}:{os.getpid()}", time.time(), config_hash),
            )
            if cur.rowcount != 1:
                raise KeyError(f"trial {config_hash} is not registered in {self.path}")

    def mark_finished(
        self, config_hash: str, *, task_name: str, selected: Mapping[str, Any], metrics: Mapping[str, Any], history: list[dict],
        timings: Mapping[str, float], environment: Mapping[str, str],
    ) -> None:
        """Store a trial's results and its ``finished`` status in one transaction."""
        with self._transaction():
            self._conn.execute(
                "UPDATE trials SET status='finished', finished_at=?, task=?, selected=?, metrics=?, history=?, "
                "timings=?, environment=?, error=NULL WHERE config_hash=?",
                (time.time(), task_name, _dumps(selected), _dumps(metrics), _dumps(history), _dumps(timings),
                 _dumps(environment), config_hash),
            )

    def mark_failed(self, config_hash: str, error: str) -> None:
        with self._transaction():
            self._conn.execute(
                "UPDATE trials SET status='failed', finished_at=?, error=? WHERE config_hash=?",
                (time.time(), error, config_hash),
            )

    # ------------------------------------------------------------------ reading
    def status(self, config_hash: str) -> str | None:
        row = self._conn.execute("SELECT status FROM trials WHERE config_hash=?", (config_hash,)).fetchone()
        return None if row is None else row["status"]

    def counts(self) -> dict[str, int]:
        """Number of trials per status."""
        rows = self._conn.execute("SELECT status, COUNT(*) AS n FROM trials GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {r["status"]: r["n"] for r in rows}

    def trials(self, status: str | None = "finished", sweep: str | None = None) -> list[StoredTrial]:
        """Trials in insertion order, optionally filtered by status and sweep name."""
        query, args = "SELECT * FROM trials WHERE 1=1", []
        if status is not None:
            query, args = query + " AND status=?", [*args, status]
        if sweep is not None:
            query, args = query + " AND sweep=?", [*args, sweep]
        return [_decode(r) for r in self._conn.execute(query + " ORDER BY rowid", args)]


def _decode(row: sqlite3.Row) -> StoredTrial:
    load = lambda key, empty: json.loads(row[key]) if row[key] is not None else empty  # noqa: E731
    return StoredTrial(
        config_hash=row["config_hash"], sweep=row["sweep"], task=row["task"], backbone=row["backbone"],
        method=row["method"], seed=row["seed"], config=json.loads(row["config"]), status=row["status"],
        attempts=row["attempts"], selected=load("selected", {}), metrics=load("metrics", {}),
        history=load("history", []), timings=load("timings", {}), environment=load("environment", {}),
        error=row["error"],
    )
