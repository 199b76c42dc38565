"""The results database: one SQLite row per trial, written so a crash never corrupts it.

A trial moves ``pending -> running -> finished`` (or ``failed``). Each move is one
transaction, and the results of a trial (metrics, per-epoch history, timings, versions,
diagnostics) are written together with its ``finished`` status in the same transaction, so
a process killed at any moment leaves either a finished trial with all of its results or an
unfinished one that the next run of the sweep simply repeats. The database runs in WAL
mode with ``synchronous=FULL``: readers (``lpft report``) never block the writer, and a
committed trial survives a ``kill -9``.

Several processes (two sweeps, Ray workers) may share one database. A process runs a trial
only under a *lease*: :meth:`Store.claim` moves the trial to ``running`` for this process
in one ``BEGIN IMMEDIATE`` transaction, and only if it is ``pending``, ``failed``, or
``running`` under a holder that is gone. A finished trial is never claimed again unless
:meth:`Store.reopen` puts it back to ``pending`` (a soup whose ingredients changed). The lease
records the holder's host, pid, the pid's start time and a random token, and a heartbeat
time. A holder on this host (same machine boot and pid namespace) is gone when its pid is
dead or belongs to another process by now (a different start time); a holder elsewhere is
gone when its heartbeat is older than :data:`LEASE_TIMEOUT` (so hosts' clocks must agree to
well within it). While a trial runs, :meth:`Store.lease` keeps the heartbeat fresh from a
background thread. :meth:`Store.mark_finished` and :meth:`Store.mark_failed` write only
while this process still holds the lease, so a process whose lease was taken over cannot
overwrite the newer result::

    with Store(db) as store:
        if store.claim(h):
            with store.lease(h):
                ...  # run the trial
                store.mark_finished(h, ...)

``Store(path, readonly=True)`` never writes: ``lpft report`` reads a database it may not
write (a colleague's file, a read-only mount), and reads an older schema as it is.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lpft.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
STATUSES = ("pending", "running", "finished", "failed")
LEASE_TIMEOUT = 600.0  # seconds without a heartbeat after which a holder on another host counts as gone
HEARTBEAT_INTERVAL = 30.0  # seconds between heartbeats of Store.lease; well under LEASE_TIMEOUT

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS trials (
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
    error        TEXT,
    diagnostics  TEXT,                      -- JSON: what the method measured on the way (v2)
    lease_host   TEXT,                      -- the lease holder's host name (v2)
    lease_space  TEXT,                      -- its boot id and pid namespace: where its pid means something (v2)
    lease_pid    INTEGER,                   -- (v2)
    lease_pid_start INTEGER,                -- its pid's start (clock ticks since boot): tells a reused pid apart (v2)
    lease_token  TEXT,                      -- random, one per process: whether this process holds the lease (v2)
    heartbeat_at REAL                       -- the holder's last sign of life (v2)
)""",
    "CREATE INDEX IF NOT EXISTS trials_by_status ON trials (status)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Columns schema 2 added to schema 1, which opening a schema-1 database writable adds in place.
_ADDED_IN_V2 = {
    "diagnostics": "TEXT", "lease_host": "TEXT", "lease_space": "TEXT", "lease_pid": "INTEGER",
    "lease_pid_start": "INTEGER", "lease_token": "TEXT", "heartbeat_at": "REAL",
}


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
    diagnostics: dict[str, Any]
    error: str | None


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store:
    """A trial database in one SQLite file; safe to open from several processes.

    ``readonly=True`` opens it with SQLite's ``mode=ro`` and never writes (no WAL switch, no
    schema change); a schema-1 database is then read as it is. Opened writable, a schema-1
    database is migrated to schema 2 in place.
    """

    def __init__(self, path: Path | str, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._conn = self._connect_readonly() if readonly else self._connect_writable()
        self._conn.row_factory = sqlite3.Row

    def _connect_writable(self) -> sqlite3.Connection:
        """Open (creating if needed) and migrate; StoreError if this process cannot write the file."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of results database {self.path}: {exc}") from exc
        # SQLite silently opens an unwritable file read-only and fails only at the first write, and it
        # needs to create its -wal and -shm files next to the database: check both up front.
        if not _writable(folder) or (self.path.exists() and not _writable(self.path)):
            raise self._readonly_error()
        # isolation_level=None: no implicit transactions; every write below opens its own.
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                _migrate(conn, self.path)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            if "readonly" in str(exc) or "unable to open" in str(exc):
                raise self._readonly_error() from exc
            raise StoreError(f"cannot open results database {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _readonly_error(self) -> StoreError:
        return StoreError(
            f"results database {self.path} (or its folder) is not writable by this process; to read it, "
            "open it read-only: lpft report can (Store(path, readonly=True)); to run trials into it, "
            "make the file and its folder writable or use another database"
        )

    def _connect_readonly(self) -> sqlite3.Connection:
        """Open with ``mode=ro``; a closed WAL database in a folder this process cannot write is read as immutable."""
        if not self.path.is_file():
            raise StoreError(f"no results database at {self.path}; run a sweep into it first "
                             f"(lpft sweep SPEC --db {self.path})")
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        try:
            conn, version = _open_readonly(uri, self.path)
        except sqlite3.OperationalError as exc:
            # A WAL reader needs the -shm file, which it cannot create in a folder it may not write. With no
            # -wal file no writer has the database open (the last one to close removes it): read the file as
            # the immutable snapshot it then is.
            wal = self.path.with_name(self.path.name + "-wal")
            if "unable to open" not in str(exc) or wal.exists() or _writable(self.path.parent):
                raise StoreError(f"cannot read results database {self.path}: {exc}") from exc
            conn, version = _open_readonly(uri + "&immutable=1", self.path)
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"{self.path} has results schema {version}, this lpft reads up to {SCHEMA_VERSION}; "
                             "upgrade lpft to read it")
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` takes the write lock up front, so two writers never deadlock."""
        if self.readonly:
            raise StoreError(f"results database {self.path} is open read-only; open it without readonly=True to write")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already (a full disk does)
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                raise
            raise StoreError(f"results database {self.path}: {exc}; free space on its disk and run the same command "
                             "again (finished trials are kept, this one is not lost: it runs again)") from exc

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

    def claim(self, config_hash: str) -> bool:
        """Take a registered trial to run under this process's lease; counts the attempt.

        True if it was ``pending``, ``failed``, or ``running`` under a holder that is gone
        (see the module docstring); False if it is ``finished`` or held by a live holder,
        this process included. Decided and written in one ``BEGIN IMMEDIATE`` transaction,
        so of several processes claiming one trial exactly one wins.
        """
        me, now = _holder(os.getpid()), time.time()
        with self._transaction():
            row = self._conn.execute("SELECT * FROM trials WHERE config_hash=?", (config_hash,)).fetchone()
            if row is None:
                raise KeyError(f"trial {config_hash} is not registered in {self.path}")
            if row["status"] == "finished":
                return False
            if row["status"] == "running":
                if _holder_alive(row, now):
                    return False
                log.info("trial %s: its holder %s is gone; taking it over", config_hash[:12], row["worker"])
            self._conn.execute(
                "UPDATE trials SET status='running', attempts=attempts+1, worker=:worker, started_at=:now, "
                "finished_at=NULL, error=NULL, lease_host=:lease_host, lease_space=:lease_space, lease_pid=:lease_pid, "
                "lease_pid_start=:lease_pid_start, lease_token=:lease_token, heartbeat_at=:now WHERE config_hash=:hash",
                {**me, "worker": f"{me['lease_host']}:{me['lease_pid']}", "now": now, "hash": config_hash},
            )
        return True

    @contextmanager
    def lease(self, config_hash: str, interval: float = HEARTBEAT_INTERVAL) -> Iterator[None]:
        """Keep this process's lease on a claimed trial alive while the block runs.

        A daemon thread with its own connection renews the heartbeat every ``interval``
        seconds, so a trial longer than :data:`LEASE_TIMEOUT` is not taken over by a process
        on another host; it stops when the block exits or the lease is no longer this
        process's (the trial was marked, or taken over).
        """
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(config_hash, interval, stop), daemon=True,
                                name=f"lpft-lease-{config_hash[:12]}")
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()

    def _heartbeat(self, config_hash: str, interval: float, stop: threading.Event) -> None:
        token = _holder(os.getpid())["lease_token"]
        conn = sqlite3.connect(self.path, timeout=interval, isolation_level=None)
        try:
            while not stop.wait(interval):
                try:
                    cur = conn.execute("UPDATE trials SET heartbeat_at=? WHERE config_hash=? AND status='running' "
                                       "AND lease_token=?", (time.time(), config_hash, token))
                except sqlite3.Error as exc:  # e.g. locked for longer than a beat: try again at the next one
                    log.warning("trial %s: heartbeat not written (%s); retrying", config_hash[:12], exc)
                    continue
                if cur.rowcount == 0:
                    log.debug("trial %s: lease ended; heartbeat stops", config_hash[:12])
                    return
        finally:
            conn.close()

    def _mark(self, config_hash: str, outcome: str, assignments: str, values: tuple) -> bool:
        """Set ``status=outcome`` and the given columns, only if this process holds the trial's lease."""
        with self._transaction():
            cur = self._conn.execute(
                f"UPDATE trials SET status=?, finished_at=?, {assignments} "
                "WHERE config_hash=? AND status='running' AND lease_token=?",
                (outcome, time.time(), *values, config_hash, _holder(os.getpid())["lease_token"]),
            )
        if cur.rowcount == 0:
            log.warning("trial %s: not marked %s, this process does not hold its lease (it was taken over, "
                        "or never claimed); the store keeps the other holder's result", config_hash[:12], outcome)
            return False
        return True

    def mark_finished(
        self, config_hash: str, *, task_name: str, selected: Mapping[str, Any], metrics: Mapping[str, Any],
        history: list[dict], timings: Mapping[str, float], environment: Mapping[str, str],
        diagnostics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Store a trial's results and its ``finished`` status in one transaction; False if not our lease."""
        return self._mark(
            config_hash, "finished", "task=?, selected=?, metrics=?, history=?, timings=?, environment=?, "
            "diagnostics=?, error=NULL",
            (task_name, _dumps(selected), _dumps(metrics), _dumps(history), _dumps(timings), _dumps(environment),
             _dumps(diagnostics or {})),
        )

    def reopen(self, config_hash: str) -> None:
        """Put a finished trial back to ``pending`` (its results stay until a new ``mark_finished``).

        For a derived trial whose inputs changed since it finished (a soup with new ingredients):
        the next :meth:`claim` takes it and its results are overwritten in one transaction.
        """
        with self._transaction():
            self._conn.execute("UPDATE trials SET status='pending' WHERE config_hash=? AND status='finished'",
                               (config_hash,))

    def mark_failed(self, config_hash: str, error: str) -> bool:
        """Record a trial as ``failed`` (claimable again) with its error; False if not our lease."""
        return self._mark(config_hash, "failed", "error=?", (error,))

    # ------------------------------------------------------------------ reading
    def status(self, config_hash: str) -> str | None:
        row = self._conn.execute("SELECT status FROM trials WHERE config_hash=?", (config_hash,)).fetchone()
        return None if row is None else row["status"]

    def trial(self, config_hash: str) -> StoredTrial | None:
        """One trial by its hash, whatever its status; None when it is not registered."""
        row = self._conn.execute("SELECT * FROM trials WHERE config_hash=?", (config_hash,)).fetchone()
        return None if row is None else _decode(row)

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


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema, or bring a schema-1 database to schema 2; inside the caller's write transaction.

    Adds whichever schema-2 columns are missing, so it is idempotent, and concurrent opens
    are serialised by the transaction's write lock.
    """
    for statement in _SCHEMA:
        conn.execute(statement)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is not None and int(row[0]) > SCHEMA_VERSION:
        raise StoreError(f"{path} has results schema {row[0]}, this lpft writes {SCHEMA_VERSION}; "
                         "upgrade lpft or use a new database file")
    have = {r[1] for r in conn.execute("PRAGMA table_info(trials)")}
    for column, kind in _ADDED_IN_V2.items():
        if column not in have:
            conn.execute(f"ALTER TABLE trials ADD COLUMN {column} {kind}")
    if row is None or int(row[0]) != SCHEMA_VERSION:
        if row is not None:
            log.info("results database %s: migrated from schema %s to %d", path, row[0], SCHEMA_VERSION)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _open_readonly(uri: str, path: Path) -> tuple[sqlite3.Connection, int]:
    """A read-only connection and the database's schema version (the first read is what may fail)."""
    conn = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        if "no such table" in str(exc) or "not a database" in str(exc):
            raise StoreError(f"{path} is not an lpft results database: {exc}") from exc
        raise
    if row is None:
        conn.close()
        raise StoreError(f"{path} is not an lpft results database (it has no schema version)")
    return conn, int(row[0])


def _writable(path: Path) -> bool:
    """Whether this process may write ``path``: mode bits, read-only mounts and immutable flags all count."""
    if os.access in os.supports_effective_ids:
        return os.access(path, os.W_OK, effective_ids=True)
    return os.access(path, os.W_OK)


@functools.cache
def _holder(pid: int) -> dict[str, Any]:
    """This process's lease columns; keyed on the pid, so a forked child gets its own token."""
    stat = _proc_stat(pid)
    return {"lease_host": socket.gethostname(), "lease_space": _pid_space(), "lease_pid": pid,
            "lease_pid_start": stat[1] if stat else None, "lease_token": secrets.token_hex(16)}


def _pid_space() -> str:
    """Boot id and pid namespace: two processes can compare pids only if these match ('' where unknown)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State and start time (clock ticks since boot) of ``pid`` from /proc; None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[19])


def _holder_alive(row: sqlite3.Row, now: float) -> bool:
    """Whether the lease on a ``running`` row is still held (see the module docstring).

    On this host (same boot and pid namespace) the pid decides: dead, a zombie, or started
    at another time (reused) means gone. Where the pid cannot be checked (another host, no
    /proc, a row written before leases), the heartbeat decides.
    """
    me = _holder(os.getpid())
    heartbeat = row["heartbeat_at"] if row["heartbeat_at"] is not None else row["started_at"]
    fresh = heartbeat is not None and now - heartbeat < LEASE_TIMEOUT
    here = (row["lease_host"], row["lease_space"]) == (me["lease_host"], me["lease_space"])
    if row["lease_pid"] is None or not me["lease_space"] or not here:
        return fresh
    try:
        os.kill(row["lease_pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process, alive
    stat = _proc_stat(row["lease_pid"])
    if stat is None:  # alive but hidden from /proc (hidepid)
        return fresh
    state, started = stat
    return state not in ("Z", "X") and started == row["lease_pid_start"]


def _decode(row: sqlite3.Row) -> StoredTrial:
    columns = row.keys()  # a schema-1 database read as it is lacks the schema-2 columns
    load = lambda key, empty: json.loads(row[key]) if key in columns and row[key] is not None else empty  # noqa: E731
    return StoredTrial(
        config_hash=row["config_hash"], sweep=row["sweep"], task=row["task"], backbone=row["backbone"],
        method=row["method"], seed=row["seed"], config=json.loads(row["config"]), status=row["status"],
        attempts=row["attempts"], selected=load("selected", {}), metrics=load("metrics", {}),
        history=load("history", []), timings=load("timings", {}), environment=load("environment", {}),
        diagnostics=load("diagnostics", {}), error=row["error"],
    )
