"""Where lpft keeps prepared data and cached features, and how cache files are written.

Every cache file (prepared benchmarks, features) appears by one rename of a complete
temporary file, so it is never half-written. A writer killed mid-write leaves its temporary
file behind; :func:`remove_stale_temps` deletes such orphans without touching a file that a
live process is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

# A writer rewrites its temporary file continuously; one untouched this long is orphaned
# (its writer hung, or ran on another machine or in another container, where its pid means nothing here).
STALE_TEMP_SECONDS = 15 * 60
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# ".<target name>.<host>-<pid>-<mkstemp's random part>.tmp"; host and pid say whose it is
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[a-z0-9_]+\.tmp$")


def cache_dir() -> Path:
    """``$LPFT_CACHE`` if set, else ``~/.cache/lpft``; created on first use."""
    root = Path(os.environ.get("LPFT_CACHE") or Path.home() / ".cache" / "lpft")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new contents to; one rename makes it ``path`` when the block succeeds.

    A crash or Ctrl-C mid-write leaves the old file (or none), never a truncated one; two
    processes writing at once both succeed. The temporary file's name records this host and
    pid, so :func:`remove_stale_temps` can tell a live writer's file from an orphan.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes, atomically (:func:`atomic_target`)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        write(f)


def remove_stale_temps(folder: Path) -> None:
    """Delete the orphaned temporary files of :func:`write_atomic` in ``folder``.

    A temporary file is orphaned when its writer, on this host, is no longer running, or when
    it has not been modified for :data:`STALE_TEMP_SECONDS`. A live writer's file is left alone.
    """
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except FileNotFoundError:
        return
    now = time.time()
    for entry in entries:
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # its writer just renamed it
            continue
        owner = _TEMP_NAME.match(entry.name)
        dead = owner is not None and owner["host"] == _HOST and not _pid_alive(int(owner["pid"]))
        if dead or age > STALE_TEMP_SECONDS:
            try:
                Path(entry.path).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove orphaned temporary file %s: %s", entry.path, exc)
                continue
            why = "its writer is gone" if dead else f"untouched for {age / 60:.0f} min"
            log.info("removed orphaned temporary file %s (%s)", entry.path, why)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else, or we cannot tell: assume alive
        return True
    return True
