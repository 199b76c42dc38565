"""The results store shared by several processes: leases, schema migration, read-only opening.

Holders are real processes (started, SIGKILLed, left as zombies); only what cannot happen
on one machine, a holder on another host, is written into its row by hand.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lpft.errors import StoreError
from lpft.results import store as store_module
from lpft.results.store import LEASE_TIMEOUT, SCHEMA_VERSION, Store

SPAWN = multiprocessing.get_context("spawn")  # children start clean: no inherited connections or threads


def _config(seed: int) -> dict:
    return {"task": "t", "backbone": "b", "backbone_options": {}, "method": "lp", "task_options": {},
            "hyperparameters": {"C": 1.0, "seed": seed}}


def _registered(db: Path, n: int = 1) -> list[str]:
    """``n`` pending trials in a new database; returns their hashes."""
    hashes = [f"trial{i:03d}" for i in range(n)]
    with Store(db) as store:
        for i, h in enumerate(hashes):
            store.register("s", h, _config(i))
    return hashes


def _finish(store: Store, h: str, metrics: dict | None = None) -> bool:
    return store.mark_finished(h, task_name="t", selected={"C": 1.0}, metrics=metrics or {"id_val": {"accuracy": 0.5}},
                               history=[], timings={"fit_seconds": 0.1}, environment={"torch": "x"})


def _row(db: Path, h: str) -> dict:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM trials WHERE config_hash=?", (h,)).fetchone())


def _set(db: Path, h: str, **columns) -> None:
    """Write a row's lease columns by hand (what a holder on another host would have written)."""
    with sqlite3.connect(db) as conn:
        assignments = ", ".join(f"{k}=?" for k in columns)
        conn.execute(f"UPDATE trials SET {assignments} WHERE config_hash=?", (*columns.values(), h))


# ---------------------------------------------------------------------- claim semantics
def test_claim_takes_pending_and_failed_trials_and_never_a_finished_one(tmp_path, caplog):
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert not _finish(store, h), "a trial never claimed must not be marked"
        assert "does not hold its lease" in caplog.text and store.status(h) == "pending"
        assert store.claim(h)
        assert not store.claim(h), "this process holds it: claiming again must not count a second attempt"
        row = _row(db, h)
        assert (row["status"], row["attempts"], row["lease_pid"]) == ("running", 1, os.getpid())
        assert row["worker"] == f"{row['lease_host']}:{os.getpid()}" and row["heartbeat_at"] >= row["started_at"]
        assert store.mark_failed(h, "boom")
        assert store.claim(h), "a failed trial is claimable again"
        assert _finish(store, h) and store.status(h) == "finished"
        finished_at = _row(db, h)["finished_at"]
        assert not store.claim(h) and not store.claim(h)
        store.register("s", h, _config(0))  # re-registering keeps it finished
        (trial,) = store.trials()
        assert (trial.status, trial.attempts, trial.error) == ("finished", 2, None)
        assert _row(db, h)["finished_at"] == finished_at
        with pytest.raises(KeyError, match="not registered"):
            store.claim("unknown")


def test_diagnostics_are_stored_with_the_results(tmp_path):
    db = tmp_path / "r.sqlite"
    a, b = _registered(db, 2)
    with Store(db) as store:
        assert store.claim(a) and store.claim(b)
        diagnostics = {"first_step_grad_norm": {"head": 0.7, "body": 0.03}}
        assert store.mark_finished(a, task_name="t", selected={}, metrics={}, history=[], timings={}, environment={},
                                   diagnostics=diagnostics)
        assert _finish(store, b)  # without diagnostics
        assert {t.config_hash: t.diagnostics for t in store.trials()} == {a: diagnostics, b: {}}


def _hold(db: str, h: str, claimed) -> None:
    """Child: claim ``h`` and hold it (alive; on one host no heartbeat is needed) until killed."""
    with Store(db) as store:
        claimed.put(store.claim(h))
        time.sleep(60)


def test_a_live_holder_is_refused_and_a_sigkilled_one_loses_its_lease(tmp_path):
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    claimed = SPAWN.Queue()
    child = SPAWN.Process(target=_hold, args=(str(db), h, claimed))
    child.start()
    try:
        assert claimed.get(timeout=60) is True
        with Store(db) as store:
            assert not store.claim(h), "the child is alive and holds the trial"
            assert _row(db, h)["lease_pid"] == child.pid
            os.kill(child.pid, signal.SIGKILL)
            # not reaped yet: the child is a zombie, which holds nothing
            deadline = time.monotonic() + 10
            while not store.claim(h):
                assert time.monotonic() < deadline, "a SIGKILLed holder's lease never expired"
                time.sleep(0.01)
            assert child.exitcode is None or child.exitcode == -signal.SIGKILL
            row = _row(db, h)
            assert (row["status"], row["attempts"], row["lease_pid"]) == ("running", 2, os.getpid())
            assert _finish(store, h)
    finally:
        child.kill()
        child.join(10)


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h)
        start = _row(db, h)["lease_pid_start"]
        assert start is not None
        # the holder had this (live) pid once, but the process now using it started at another time
        _set(db, h, lease_token="a-dead-process", lease_pid_start=start - 1)
        assert store.claim(h)
        assert _row(db, h)["attempts"] == 2


def test_a_holder_on_another_host_expires_only_when_its_heartbeat_is_stale(tmp_path):
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h)
        # another host's holder: its pid means nothing here, only its heartbeat counts
        _set(db, h, lease_host="elsewhere", lease_token="theirs", lease_pid=os.getpid(), heartbeat_at=time.time() - 60)
        assert not store.claim(h)
        _set(db, h, heartbeat_at=time.time() - LEASE_TIMEOUT - 1)
        assert store.claim(h)
        assert _row(db, h)["lease_host"] != "elsewhere"


def _take_over(db: str, h: str) -> None:
    """Child: claim ``h`` (its holder counts as gone) and finish it."""
    with Store(db) as store:
        assert store.claim(h)
        assert _finish(store, h, {"id_val": {"accuracy": 0.9}})


def test_a_process_whose_lease_was_taken_over_cannot_overwrite_the_result(tmp_path, caplog):
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h)
        # this process stalls long enough that, seen from elsewhere, its heartbeat is stale
        _set(db, h, lease_host="elsewhere", heartbeat_at=time.time() - LEASE_TIMEOUT - 1)
        child = SPAWN.Process(target=_take_over, args=(str(db), h))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        with caplog.at_level(logging.WARNING, logger="lpft.results.store"):
            assert not _finish(store, h, {"id_val": {"accuracy": 0.1}})
            assert not store.mark_failed(h, "late")
        assert caplog.text.count("does not hold its lease") == 2
        (trial,) = store.trials()
        assert trial.metrics == {"id_val": {"accuracy": 0.9}} and trial.attempts == 2 and trial.error is None


def test_lease_keeps_a_slow_trial_alive_then_lets_it_expire(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LEASE_TIMEOUT", 0.5)
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h)
        _set(db, h, lease_host="elsewhere")  # judge the holder by its heartbeat, as another host would
        first = _row(db, h)["heartbeat_at"]
        with store.lease(h, interval=0.05):
            time.sleep(1.5)  # a trial three lease timeouts long
            assert not store.claim(h), "the heartbeat is fresh: the lease must hold"
            assert _row(db, h)["heartbeat_at"] > first + 1.0
        assert not any(t.name.startswith("lpft-lease") for t in threading.enumerate())
        time.sleep(0.6)
        assert store.claim(h), "no heartbeat after the lease ended: it must expire"


def test_lease_heartbeat_stops_once_the_trial_is_marked(tmp_path):
    db = tmp_path / "r.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h)
        with store.lease(h, interval=0.02):
            assert _finish(store, h)
            finished = _row(db, h)
            time.sleep(0.2)
            assert not [t for t in threading.enumerate() if t.name.startswith("lpft-lease")], "heartbeat still beating"
        assert _row(db, h) == finished


def _claim_all(db: str, hashes: list[str], start, done, out) -> None:
    """Child: claim every trial it can, in its own order, hold them until every child has tried; report the winners."""
    random.shuffle(hashes)
    won = []
    with Store(db) as store:
        start.wait(60)
        for h in hashes:
            if store.claim(h):
                won.append(h)
            time.sleep(random.uniform(0, 0.002))  # a tight loop would starve the others, asleep in SQLite's busy wait
        out.put((os.getpid(), won))
        done.wait(60)


def test_concurrent_claimers_get_disjoint_trials(tmp_path):
    db = tmp_path / "r.sqlite"
    hashes = _registered(db, 200)
    n = 4
    start, done, out = SPAWN.Barrier(n), SPAWN.Barrier(n), SPAWN.Queue()
    children = [SPAWN.Process(target=_claim_all, args=(str(db), hashes, start, done, out)) for _ in range(n)]
    for c in children:
        c.start()
    won = dict(out.get(timeout=120) for _ in children)
    for c in children:
        c.join(60)
        assert c.exitcode == 0
    claimed = [h for hs in won.values() for h in hs]
    assert sorted(claimed) == hashes, "every trial claimed exactly once"
    assert sum(bool(hs) for hs in won.values()) >= 2, f"no contention happened: {[len(hs) for hs in won.values()]}"
    with Store(db) as store:
        assert {t.config_hash: t.attempts for t in store.trials("running")} == dict.fromkeys(hashes, 1)
    for pid, hs in won.items():
        assert {_row(db, h)["lease_pid"] for h in hs} <= {pid}


# ---------------------------------------------------------------------- schema 1 -> 2
# The schema-1 SQL exactly as lpft wrote it before leases (src/lpft/results/store.py, SCHEMA_VERSION = 1).
V1_SCHEMA = """
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
V1_ROWS = [  # (hash, status, started_at, metrics): finished, interrupted long ago, running right now
    ("done", "finished", 1.0, '{"id_val":{"accuracy":0.75}}'),
    ("interrupted", "running", 1.0, None),
    ("busy", "running", None, None),  # started_at: now
]


def _v1_database(path: Path) -> Path:
    """A schema-1 database as lpft 1 left it: WAL mode, its schema, three trials."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    for i, (h, status, started, metrics) in enumerate(V1_ROWS):
        conn.execute(
            "INSERT INTO trials (config_hash, sweep, task, backbone, method, seed, config, status, attempts, worker, "
            "created_at, started_at, finished_at, selected, metrics, history, timings, environment) "
            "VALUES (?, 's', 't', 'b', 'lp', ?, ?, ?, 1, 'oldhost:1', 0, ?, ?, '{}', ?, '[]', '{}', '{}')",
            (h, i, store_module._dumps(_config(i)), status, started or time.time(), 2.0 if metrics else None, metrics),
        )
    conn.close()
    return path


def _columns(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return sorted((r[1], r[2]) for r in conn.execute("PRAGMA table_info(trials)"))


def _version(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]


def test_a_schema_1_database_is_read_as_it_is_when_opened_readonly(tmp_path):
    db = _v1_database(tmp_path / "v1.sqlite")
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), _columns(db))
    with Store(db, readonly=True) as store:
        (done,) = store.trials()
        assert done.metrics == {"id_val": {"accuracy": 0.75}} and done.diagnostics == {}
        assert store.counts() == {"pending": 0, "running": 2, "finished": 1, "failed": 0}
        with pytest.raises(StoreError, match="read-only"):
            store.claim("interrupted")
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), _columns(db)) == before and _version(db) == "1"


def _open(db: str, start) -> None:
    start.wait(60)
    Store(db).close()


def test_a_schema_1_database_is_migrated_in_place_by_concurrent_writable_opens(tmp_path):
    db = _v1_database(tmp_path / "v1.sqlite")
    n = 4
    start = SPAWN.Barrier(n)
    children = [SPAWN.Process(target=_open, args=(str(db), start)) for _ in range(n)]
    for c in children:
        c.start()
    for c in children:
        c.join(60)
        assert c.exitcode == 0, "a concurrent open failed during the migration"
    Store(tmp_path / "fresh.sqlite").close()
    assert _columns(db) == _columns(tmp_path / "fresh.sqlite"), "a migrated database has exactly the new schema"
    assert _version(db) == str(SCHEMA_VERSION) == "2"
    with Store(db) as store:  # opening a migrated database again changes nothing
        (done,) = store.trials()
        assert done.metrics == {"id_val": {"accuracy": 0.75}} and done.diagnostics == {}
        assert not store.claim("done")
        # a row claimed by lpft 1 has no lease: its start time stands in for the heartbeat
        assert store.claim("interrupted")
        assert not store.claim("busy")
        assert _finish(store, "interrupted")
    assert _columns(db) == _columns(tmp_path / "fresh.sqlite")


def test_a_newer_schema_is_refused_with_a_store_error(tmp_path):
    db = tmp_path / "r.sqlite"
    _registered(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    for readonly in (False, True):
        with pytest.raises(StoreError, match="schema 3"):
            Store(db, readonly=readonly)


# ---------------------------------------------------------------------- read-only opening
def _write_blocked(path: Path) -> bool:
    """Whether this process really cannot write ``path`` (a file) or create files in it (a folder)."""
    try:
        if path.is_dir():
            (path / ".probe").touch()
            (path / ".probe").unlink()
        else:
            path.open("r+b").close()
    except OSError:
        return True
    return False


@pytest.fixture
def unwritable(request):
    """Make a path unwritable for real: chmod, or for root (whom modes do not stop) the immutable flag.

    Yields a function returning whether it managed; everything is restored afterwards so pytest can clean up.
    """
    undo = []

    def make(path: Path) -> bool:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        undo.append(lambda: path.chmod(mode))
        if _write_blocked(path):
            return True
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            undo.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
            return _write_blocked(path)
        return False

    yield make
    for step in reversed(undo):
        step()


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_an_unwritable_file_is_read_readonly_and_refused_writable(tmp_path, unwritable):
    db = tmp_path / "results.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h) and _finish(store, h)
    blocked = unwritable(db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with Store(db, readonly=True) as store:
        assert [t.config_hash for t in store.trials()] == [h]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    if not blocked:
        pytest.skip("running as root where neither chmod nor chattr +i can stop a write: no unwritable file to open")
    with pytest.raises(StoreError, match="open it read-only: lpft report can") as err:
        Store(db)
    assert str(db) in str(err.value)


def test_a_database_in_a_readonly_folder_is_read_without_writing(tmp_path, unwritable):
    folder = tmp_path / "shared"
    db = folder / "results.sqlite"
    (h,) = _registered(db)
    with Store(db) as store:
        assert store.claim(h) and _finish(store, h)
    before = _fingerprint(folder)
    assert list(before) == ["results.sqlite"], "a closed database leaves no -wal or -shm behind"
    if not unwritable(folder):
        pytest.skip("running as root where neither chmod nor chattr +i can make a folder read-only")
    with Store(db, readonly=True) as store:
        assert [t.config_hash for t in store.trials()] == [h]
    assert _fingerprint(folder) == before
    with pytest.raises(StoreError, match="open it read-only: lpft report can") as err:
        Store(db)
    assert str(db) in str(err.value)


def test_readonly_never_writes_even_where_it_could(tmp_path):
    db = tmp_path / "results.sqlite"
    _registered(db)
    with sqlite3.connect(db) as conn:  # a database left in rollback-journal mode
        conn.execute("PRAGMA journal_mode=DELETE")
    before = _fingerprint(tmp_path)
    with Store(db, readonly=True) as store:
        assert store.counts()["pending"] == 1
        with pytest.raises(StoreError, match="read-only"):
            store.register("s", "other", _config(1))
    assert _fingerprint(tmp_path) == before, "a read-only open switched the journal mode or wrote the schema"


def test_a_missing_database_is_a_store_error_when_readonly(tmp_path):
    db = tmp_path / "nothing-here.sqlite"
    with pytest.raises(StoreError, match="no results database") as err:
        Store(db, readonly=True)
    assert str(db) in str(err.value) and not db.exists()


def test_a_full_disk_is_one_store_error_and_loses_nothing(tmp_path):
    """SQLite's page cap stands in for a full disk: the same SQLITE_FULL a write meets when the disk fills."""
    db = tmp_path / "r.sqlite"
    (first,) = _registered(db)
    with Store(db) as store:
        assert store.claim(first) and _finish(store, first)
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError, match=r"r\.sqlite: database or disk is full; free space on its disk"):
            for seed in range(1, 500):  # each trial's row grows the file until the cap
                store.register("s", f"{seed:064x}", _config(seed))
    with Store(db, readonly=True) as store:
        assert [t.config_hash for t in store.trials("finished")] == [first]
