"""Two sweeps on one results database, one of them SIGKILLed at random moments: nothing lost, nothing run twice.

Each round starts two real ``lpft sweep`` processes on the same database and the same
trials (an LP-only spec on a tiny image task, a fresh seed per round), and kills one of
them at a random moment once it has claimed a trial; the other must finish the round. A
final sweep over every round's trials then completes whatever a kill left behind.
Throughout, the database is polled: a finished trial's ``finished_at`` must never change,
and at the end every trial is finished once, with no more extra attempts than there were
kills, and in the report. ``LPFT_FAULT_SEED`` replays a run's kill moments.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from conftest import ROOT
from lpft.results.report import load_results
from lpft.results.store import Store

log = logging.getLogger(__name__)

KILLS = 10
C_GRID = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]


def _image_task(root: Path) -> Path:
    """A tiny 3-class task of 16 px PNGs and CSVs (sklearn's optdigits): features in a blink, so the
    test's time goes into what it tests, processes sharing a database, not into a backbone."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    images = np.kron((digits.images / 16 * 255).astype(np.uint8), np.ones((2, 2), dtype=np.uint8))
    order = np.random.default_rng(0).permutation(len(images))
    root.mkdir()
    for name, rows in {"train": order[:48], "val": order[48:72], "test": order[72:96]}.items():
        lines = ["path,label"]
        for i in rows:
            Image.fromarray(np.stack([images[i]] * 3, -1)).save(root / f"{name}-{i}.png")
            lines.append(f"{name}-{i}.png,{digits.target[i]}")
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    task = {"name": "tiny-digits", "modality": "image",
            "splits": {"train": "train.csv", "id_val": "val.csv", "id_test": "test.csv"}}
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    return root / "task.yaml"


def _spec(path: Path, task: Path, seeds: list[int]) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "shared-db", "task": str(task), "seeds": seeds, "methods": {"lp": {"C": C_GRID}}, "device": "cpu",
        "backbone": "efficientnet-lite0", "backbone_options": {"image_size": 32}}))
    return path


def _sweep(spec: Path, db: Path, env: dict, output: Path) -> subprocess.Popen:
    """A real ``lpft sweep`` process; its output goes to a file (a pipe nobody reads could block it)."""
    with output.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "lpft.cli", "sweep", str(spec), "--db", str(db), "--no-report"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


class Watch:
    """Polls the database; fails as soon as a finished trial's ``finished_at`` changes or it stops being finished."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.finished_at: dict[str, float] = {}

    def rows(self, query: str, args: tuple = ()) -> list[tuple]:
        if not self.db.exists():
            return []
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30) as conn:
                return conn.execute(query, args).fetchall()
        except sqlite3.OperationalError as exc:  # before the first sweep created the schema
            if "no such table" in str(exc) or "unable to open" in str(exc):
                return []
            raise

    def check(self) -> None:
        now = {h: (s, f) for h, s, f in self.rows("SELECT config_hash, status, finished_at FROM trials")}
        for h, first in self.finished_at.items():
            assert now[h] == ("finished", first), f"finished trial {h[:12]} changed to {now[h]} (finished at {first})"
        self.finished_at |= {h: f for h, (s, f) in now.items() if s == "finished"}

    def holds(self, pid: int, seed: int, status: tuple[str, ...] = ("running", "finished")) -> int:
        """How many of the round's trials ``pid`` claimed and has (``running``) or had (``finished``)."""
        marks = ",".join("?" * len(status))
        return len(self.rows(f"SELECT 1 FROM trials WHERE lease_pid=? AND seed=? AND status IN ({marks})",
                             (pid, seed, *status)))

    def wait(self, until, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            self.check()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
        self.check()


def test_two_sweeps_on_one_database_with_random_sigkills(tmp_path):
    seed = int(os.environ.get("LPFT_FAULT_SEED") or random.randrange(2**32))  # set it to replay a failure
    log.info("LPFT_FAULT_SEED=%d", seed)
    rng = random.Random(seed)
    env = {**os.environ, "LPFT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    started: list[subprocess.Popen] = []
    try:
        _rounds_then_final(tmp_path, env, rng, started)
    finally:  # a failed assertion must not leave sweeps running
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _rounds_then_final(tmp_path: Path, env: dict, rng: random.Random, started: list[subprocess.Popen]) -> None:
    """The rounds until ``KILLS`` kills landed, the final sweep, and the checks; every process goes into ``started``."""
    db = tmp_path / "results.sqlite"
    watch = Watch(db)
    task = _image_task(tmp_path / "task")
    start = time.monotonic()
    kills = interrupted = rounds = 0
    while kills < KILLS:
        assert rounds < 2 * KILLS, f"only {kills} kills landed in {rounds} rounds"
        spec = _spec(tmp_path / f"round{rounds}.yaml", task, [rounds])
        logs = [tmp_path / f"round{rounds}-{i}.log" for i in range(2)]
        pair = [_sweep(spec, db, env, logs[0]), _sweep(spec, db, env, logs[1])]
        started += pair
        victim = rng.choice(pair)
        survivor = pair[1 - pair.index(victim)]
        claimed = lambda: watch.holds(victim.pid, rounds) or victim.poll() is not None  # noqa: E731
        watch.wait(claimed, 120, "the victim's first claim")
        moment = time.monotonic() + rng.uniform(0.0, 1.0)  # its share of the round's trials takes about a second
        watch.wait(lambda: time.monotonic() >= moment or victim.poll() is not None, 10, "the kill moment")
        if victim.poll() is None:
            interrupted += watch.holds(victim.pid, rounds, ("running",)) > 0
            victim.send_signal(signal.SIGKILL)
            kills += 1
        victim.wait(60)
        watch.wait(lambda: survivor.poll() is not None, 120, "the surviving sweep")
        assert survivor.returncode == 0, logs[pair.index(survivor)].read_text()[-3000:]
        rounds += 1

    final = _sweep(_spec(tmp_path / "all.yaml", task, list(range(rounds))), db, env, tmp_path / "final.log")
    started.append(final)
    watch.wait(lambda: final.poll() is not None, 120, "the final sweep")
    assert final.returncode == 0, (tmp_path / "final.log").read_text()[-3000:]
    seconds = time.monotonic() - start

    total = rounds * len(C_GRID)
    with Store(db, readonly=True) as store:
        assert store.counts() == {"pending": 0, "running": 0, "finished": total, "failed": 0}
        trials = store.trials()
    assert {t.config_hash: watch.finished_at[t.config_hash] for t in trials} == watch.finished_at
    extra = sum(t.attempts - 1 for t in trials)
    assert extra <= kills, (
        f"{extra} extra attempts for {kills} kills: a trial ran more often than kills interrupted it")
    assert interrupted >= 1, "no kill landed inside a trial: the takeover of a dead holder's lease was not exercised"
    records = load_results(db)
    assert sorted((r.hyperparameters["seed"], r.hyperparameters["C"]) for r in records) == sorted(
        (s, c) for s in range(rounds) for c in C_GRID)
    log.info("%d rounds, %d trials, %d kills (%d inside a trial), %d extra attempts, %.0fs",
             rounds, total, kills, interrupted, extra, seconds)
