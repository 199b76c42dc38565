"""The Task contract: class names, the ID splits and any number of named OOD test splits.

A task owns its splits (as in WILDS): ``train`` (fit), ``id_val`` (model selection),
``id_test`` (reported ID accuracy) and ``ood`` (reported OOD accuracy, never used for
selection). Every split is validated when the task is built, so a bad label or an empty
split fails at load time with a message that names the split, the file and the line (the
row, for in-memory arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lpft.errors import TaskError

log = logging.getLogger(__name__)

Modality = Literal["image", "text"]
MODALITIES: tuple[str, ...] = ("image", "text")
ID_SPLITS: tuple[str, ...] = ("train", "id_val", "id_test")


@dataclass(frozen=True)
class Split:
    """One labelled split.

    ``inputs`` holds, per example, a string (text tasks), an image reference (a file path, a
    range of a tar shard or encoded bytes: :mod:`lpft.data.images`) or, for in-memory image
    tasks, a ``uint8`` array ``[N, H, W, 3]``. ``labels`` are integer indices into the task's
    ``classes``. ``source`` names where the rows came from (a CSV or Parquet file, a folder, a
    pattern of shards, ``"arrays"``) and ``lines``, when the rows came from a CSV, the line
    each row is on, so errors can point at them (:meth:`locate`).
    """

    name: str
    inputs: Sequence | np.ndarray
    labels: np.ndarray
    source: str = "arrays"
    lines: Sequence[int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def locate(self, row: int) -> str:
        """Where row ``row`` (0-based) is: ``train.csv, line 5: images/a.jpg``, or the image reference itself."""
        if self.lines is not None:
            where = f"{self.source}, line {self.lines[row]}"
        elif isinstance(self.inputs, np.ndarray) or isinstance(self.inputs[row], str):
            where = f"{self.source}, row {row + 1}"
        else:
            return str(self.inputs[row])  # a file, or a shard member: names itself
        return where if isinstance(self.inputs, np.ndarray) else f"{where}: {self.inputs[row]}"


@dataclass(frozen=True)
class Task:
    """A labelled transfer task with ID splits and named OOD test splits."""

    name: str
    modality: Modality
    classes: tuple[str, ...]
    train: Split
    id_val: Split
    id_test: Split
    ood: Mapping[str, Split] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise TaskError(f"task {self.name!r}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if len(self.classes) < 2:
            raise TaskError(f"task {self.name!r}: needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise TaskError(f"task {self.name!r}: duplicate class names in {list(self.classes)}")
        for key, split in self.splits():
            _check_split(self, key, split)
        train_classes = set(np.unique(self.train.labels).tolist())
        for key, split in self.splits():
            unseen = sorted(set(np.unique(split.labels).tolist()) - train_classes)
            if unseen:
                names = [self.classes[i] for i in unseen]
                raise TaskError(
                    f"task {self.name!r}: split {key!r} ({split.source}) has classes {names} that never "
                    "occur in train; a model cannot learn them. Remove those rows or add training examples."
                )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def splits(self) -> Iterator[tuple[str, Split]]:
        """All splits as ``(key, split)``: ``train``, ``id_val``, ``id_test``, then ``ood/<name>``."""
        yield "train", self.train
        yield from self.eval_splits()

    def eval_splits(self) -> Iterator[tuple[str, Split]]:
        """The evaluated splits, keyed as in results: ``id_val``, ``id_test``, ``ood/<name>``."""
        yield "id_val", self.id_val
        yield "id_test", self.id_test
        for name, split in self.ood.items():
            yield f"ood/{name}", split

    def split(self, key: str) -> Split:
        """The split stored under ``key`` (as yielded by :meth:`splits`)."""
        for k, s in self.splits():
            if k == key:
                return s
        raise KeyError(f"task {self.name!r} has no split {key!r}; it has {[k for k, _ in self.splits()]}")

    def summary(self) -> str:
        sizes = ", ".join(f"{k}={len(s)}" for k, s in self.splits())
        return f"{self.name} ({self.modality}, {self.num_classes} classes): {sizes}"

    @classmethod
    def from_arrays(
        cls,
        name: str,
        modality: Modality,
        splits: Mapping[str, tuple[Sequence | np.ndarray, Sequence | np.ndarray]],
        ood: Mapping[str, tuple[Sequence | np.ndarray, Sequence | np.ndarray]] | None = None,
        classes: Sequence[str] | None = None,
    ) -> Task:
        """Build a task from in-memory ``(inputs, labels)`` pairs.

        ``splits`` must hold ``train``, ``id_val`` and ``id_test``. Labels may be strings or
        ints (numpy arrays or torch tensors too); without ``classes`` the class names are the
        sorted distinct training labels. Images are ``uint8`` arrays ``[N, H, W, 3]``
        (a grayscale ``[N, H, W]`` array is expanded to 3 channels).
        """
        missing = [k for k in ID_SPLITS if k not in splits]
        if missing:
            raise TaskError(f"task {name!r}: missing splits {missing}; give train, id_val and id_test")
        extra = sorted(set(splits) - set(ID_SPLITS))
        if extra:
            raise TaskError(f"task {name!r}: unknown splits {extra}; OOD splits go in `ood`")
        raw = {k: (_as_inputs(v[0], modality), _as_label_list(v[1])) for k, v in splits.items()}
        raw_ood = {k: (_as_inputs(v[0], modality), _as_label_list(v[1])) for k, v in (ood or {}).items()}
        if classes is None:
            classes = class_names_from_labels(raw["train"][1])
        classes = tuple(str(c) for c in classes)

        def make(key: str, inputs, labels) -> Split:
            return Split(key, inputs, encode_labels(labels, classes, key, "arrays"), "arrays")

        return cls(
            name=name,
            modality=modality,
            classes=classes,
            train=make("train", *raw["train"]),
            id_val=make("id_val", *raw["id_val"]),
            id_test=make("id_test", *raw["id_test"]),
            ood={k: make(f"ood/{k}", *v) for k, v in raw_ood.items()},
        )


def class_names_from_labels(labels: Sequence) -> tuple[str, ...]:
    """Sorted distinct labels as class names; integers sort numerically, not as strings."""
    values = set(labels)
    if all(isinstance(v, (int, np.integer)) for v in values):
        return tuple(str(v) for v in sorted(int(v) for v in values))
    return tuple(sorted(str(v) for v in values))


def encode_labels(
    labels: Sequence, classes: Sequence[str], split: str, source: str, where: Callable[[int], str] | None = None
) -> np.ndarray:
    """Map raw labels to class indices, naming where the first unknown label is on failure.

    ``where(row)`` says where a row is within ``source`` (``line 5`` of a CSV, as an editor
    numbers it; ``train-000001.tar:key`` of a shard); without it, as for in-memory arrays, the
    1-based row is named instead.
    """
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(labels), dtype=np.int64)
    for row, label in enumerate(labels):
        key = str(int(label)) if isinstance(label, (int, np.integer)) else str(label)
        if key not in index:
            place = where(row) if where is not None else f"row {row + 1}"
            raise TaskError(
                f"split {split!r} ({source}), {place}: unknown label {label!r}; "
                f"known classes are {list(classes)}. Fix the label or add the class to train."
            )
        out[row] = index[key]
    return out


def _as_label_list(labels) -> list:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        return labels.tolist()
    return list(labels)


def _as_inputs(inputs, modality: str):
    if hasattr(inputs, "detach"):
        inputs = inputs.detach().cpu().numpy()
    if modality == "text":
        return [str(t) for t in inputs]
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 3:
            inputs = np.repeat(inputs[..., None], 3, axis=-1)
        if inputs.ndim != 4 or inputs.shape[-1] != 3:
            raise TaskError(f"image arrays must be [N, H, W, 3] (or [N, H, W]); got shape {inputs.shape}")
        if inputs.dtype != np.uint8:
            raise TaskError(f"image arrays must be uint8 in 0..255; got dtype {inputs.dtype}")
        return inputs
    return [Path(p) for p in inputs]


def _check_split(task: Task, key: str, split: Split) -> None:
    if len(split.labels) == 0:
        raise TaskError(f"task {task.name!r}: split {key!r} ({split.source}) is empty; every split needs rows")
    if len(split.inputs) != len(split.labels):
        raise TaskError(
            f"task {task.name!r}: split {key!r} has {len(split.inputs)} inputs but {len(split.labels)} labels"
        )
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= task.num_classes))
    if bad.size:
        raise TaskError(
            f"task {task.name!r}: split {key!r} ({split.source}), row {bad[0] + 1}: label index "
            f"{split.labels[bad[0]]} is outside 0..{task.num_classes - 1}"
        )
