"""Shared fixtures: an isolated cache, and small real tasks that need no preparation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lpft.data import Task

ROOT = Path(__file__).resolve().parents[1]
TEXT_TOPICS = ROOT / "src" / "lpft" / "examples" / "text-topics" / "task.yaml"


@pytest.fixture(autouse=True)
def _quiet_threads():
    torch.set_num_threads(2)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh LPFT_CACHE for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LPFT_CACHE", str(path))
    return path


def small_digits_task(per_split: int = 60, size: int = 32) -> Task:
    """UCI optdigits (bundled with scikit-learn): 3 classes, shifted OOD = the same digits inverted."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    images = (digits.images / 16.0 * 255).astype(np.uint8)
    images = np.kron(images, np.ones((size // 8, size // 8), dtype=np.uint8))  # 8x8 -> size x size
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    take = lambda a, b: (images[order[a:b]], digits.target[order[a:b]])  # noqa: E731
    n = per_split
    return Task.from_arrays(
        "tiny-digits",
        "image",
        splits={"train": take(0, 2 * n), "id_val": take(2 * n, 3 * n), "id_test": take(3 * n, 4 * n)},
        ood={"inverted": (255 - images[order[3 * n : 4 * n]], digits.target[order[3 * n : 4 * n]])},
    )


@pytest.fixture
def digits_task() -> Task:
    return small_digits_task()


def write_png_task(root: Path) -> Path:
    """A tiny 3-class image task of PNG files and CSVs (sklearn's optdigits); OOD = inverted digits."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    images = np.kron((digits.images / 16 * 255).astype(np.uint8), np.ones((2, 2), dtype=np.uint8))  # 16 px
    order = np.random.default_rng(0).permutation(len(images))
    parts = {"train": order[:48], "val": order[48:72], "test": order[72:96]}
    (root / "img").mkdir(parents=True)
    for name, rows in [*parts.items(), ("inverted", order[72:96])]:
        lines = ["path,label"]
        for i in rows:
            pixels = 255 - images[i] if name == "inverted" else images[i]
            Image.fromarray(np.stack([pixels] * 3, -1)).save(root / "img" / f"{name}-{i}.png")
            lines.append(f"img/{name}-{i}.png,{digits.target[i]}")
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    task = {"name": "tiny-png-digits", "modality": "image",
            "splits": {"train": "train.csv", "id_val": "val.csv", "id_test": "test.csv",
                       "ood": {"inverted": "inverted.csv"}}}
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    return root / "task.yaml"
