"""Where prepared benchmark arrays live, written atomically and read back safely (:mod:`lpft.paths`)."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from lpft.paths import cache_dir, remove_stale_temps, write_atomic

log = logging.getLogger(__name__)


def benchmark_dir(name: str) -> Path:
    """``cache_dir()/benchmarks/<name>``, created on first use."""
    path = cache_dir() / "benchmarks" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` with :func:`write_atomic`: never a truncated ``.npz``."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """All arrays of a prepared ``.npz``, or ``None`` when it is not there yet or is damaged.

    A damaged file (truncated, overwritten, not a zip) is logged as a warning with its path
    and reported as missing, so the caller prepares it again and overwrites it. Orphaned
    temporary files next to it are removed first.
    """
    remove_stale_temps(path.parent)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("prepared benchmark file %s is damaged (%s: %s); preparing it again", path, type(exc).__name__, exc)
        return None
