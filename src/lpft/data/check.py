"""Decode every image of a task, in parallel, and list each one that cannot be read.

Loading a task only checks that image files exist, so that a million-image task loads in
seconds; this is the slow, complete check (``lpft data check``), run once before training so
that a corrupt file is found now rather than hours into a run. Every bad file is reported,
with its split and where it is (:meth:`~lpft.data.task.Split.locate`), not only the first;
an image that several splits use is decoded, and reported, for each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np

from lpft.data.images import load_rgb
from lpft.data.task import Split, Task

log = logging.getLogger(__name__)

CHUNK = 64  # images per task sent to a worker: large enough to amortise the pickling, small for a smooth bar


@dataclass(frozen=True)
class BadImage:
    """An image that cannot be decoded: its split (``id_val``, ``ood/sketch``), 0-based row, where it is, and why."""

    split: str
    row: int
    where: str
    error: str


def image_rows(task: Task) -> list[tuple[str, int]]:
    """``(split, row)`` of every image row of ``task``, splits in order.

    In-memory arrays and texts have nothing to decode, so a text task, or one built from
    arrays, has none.
    """
    if task.modality != "image":
        return []
    return [(key, row) for key, split in task.splits() if not isinstance(split.inputs, np.ndarray)
            for row in range(len(split))]


def check_images(task: Task, workers: int) -> list[BadImage]:
    """Decode every image of every split with :func:`~lpft.data.images.load_rgb` in ``workers`` processes.

    Returns one :class:`BadImage` per (split, row) whose image fails, in split then row order
    (an empty list when all decode). ``workers=1`` decodes in this process.
    """
    from tqdm.auto import tqdm

    from lpft.progress import progress_disabled

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    rows = image_rows(task)
    splits = dict(task.splits())
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    failed: dict[int, str] = {}  # index in rows -> error
    started = time.perf_counter()
    with tqdm(total=len(rows), desc="checking images", unit="img", disable=progress_disabled()) as bar:
        if workers == 1:
            for n, chunk in enumerate(chunks):
                failed.update((n * CHUNK + i, e) for i, e in decode_chunk(_images(splits, chunk)))
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(decode_chunk, _images(splits, chunk)): n for n, chunk in enumerate(chunks)}
                for future in as_completed(pending):
                    n = pending[future]
                    failed.update((n * CHUNK + i, e) for i, e in future.result())
                    bar.update(len(chunks[n]))
    seconds = time.perf_counter() - started
    log.debug("decoded %d images in %.1f s (%.0f images/s, %d worker processes); %d bad", len(rows), seconds,
              len(rows) / max(seconds, 1e-9), workers, len(failed))
    return [BadImage(key, row, splits[key].locate(row), failed[i])
            for i, (key, row) in enumerate(rows) if i in failed]


def _images(splits: dict[str, Split], rows: Sequence[tuple[str, int]]) -> list[object]:
    """The image references of ``rows``: all a worker receives, so nothing else of a split is pickled."""
    return [splits[key].inputs[row] for key, row in rows]


def decode_chunk(items: Sequence[object]) -> list[tuple[int, str]]:
    """``(position, error)`` for each of ``items`` that :func:`load_rgb` cannot decode (run in a worker)."""
    failed = []
    for i, item in enumerate(items):
        try:
            load_rgb(item)
        except Exception as exc:  # PIL raises many types for a bad file; each is a finding, not a crash
            failed.append((i, str(exc) or type(exc).__name__))
    return failed
