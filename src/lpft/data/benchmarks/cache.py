"""Where prepared benchmark arrays live, and how they are written without ever being half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lpft.paths import cache_dir


def benchmark_dir(name: str) -> Path:
    """``cache_dir()/benchmarks/<name>``, created on first use."""
    path = cache_dir() / "benchmarks" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` via a temporary file and one rename.

    A crash or Ctrl-C mid-write leaves only a stray temporary file, never a truncated
    ``.npz`` that a later load would trust; two processes preparing at once both succeed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """All arrays of a prepared ``.npz``, or ``None`` when it is not there yet."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
