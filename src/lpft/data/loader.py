"""Batches of a split, decoded and transformed in worker processes while the model computes.

:class:`SplitData` is how training, evaluation and feature extraction read a split:

- **Held in memory** (texts, and un-augmented images whose tensors fit
  :data:`PRELOAD_LIMIT_BYTES`): preprocessed once, then sliced per batch (on the GPU when the
  loop moves it there).
- **Streamed** (larger image splits, and every augmented training split): each batch is
  decoded and transformed by torch's ``DataLoader`` in persistent worker processes, with
  prefetching and pinned memory on CUDA, in the order the caller asks for.

The caller gives the order (the training loop's seeded permutation, a DDP shard), so results
never depend on the number of workers. Augmentation is seeded per example from ``(seed,
epoch, row)``: the same seed gives the same crops whichever worker draws them.

:func:`loading` sets how many workers to use, who decodes JPEGs (the workers, with PIL; or,
with ``decode="device"``, the main process on the training device, the workers only reading
the bytes: :mod:`lpft.data.decode`) and whether a bad training image is skipped (counted)
rather than fatal, for every split read inside it; ``lpft run --workers N --decode MODE
--skip-bad-images`` sets it for a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lpft.backbones.base import Backbone, Batch, ImageBackbone
from lpft.config import DECODE_MODES
from lpft.data.decode import EncodedJpeg, decode_jpegs, read_jpeg
from lpft.data.images import load_rgb
from lpft.data.task import Split
from lpft.errors import TaskError

log = logging.getLogger(__name__)

PRELOAD_LIMIT_BYTES = 1 << 30  # preprocess a split up front when its tensors fit in 1 GiB
PRELOAD_CHUNK = 256  # rows per batch while preprocessing a split up front
PREFETCH_BATCHES = 4  # batches each worker prepares ahead


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's), divided
    among the processes torchrun started on this machine, so DDP ranks do not oversubscribe it."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class Loading:
    """How splits are read: ``workers`` reading processes (0: in this process), who decodes, the bad-image policy.

    ``decode``: ``"workers"`` decode every image with PIL; ``"device"``: they only read the
    bytes of JPEG files, which the main process decodes a batch at a time on ``device`` (the
    device the model runs on; ``lpft run`` sets it), every other image still decoded by the
    workers; ``"auto"``: the workers, until device decoding has been measured on a GPU
    (``benchmarks/gpu_checks.sh``, step ``input_gpu``, times both).

    ``skipped`` collects, per split name, the rows of training images that could not be read
    and were left out (only with ``skip_bad_images``); the run record reports them.
    """

    workers: int = field(default_factory=available_cores)
    skip_bad_images: bool = False
    decode: str = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def decoder(self, backbone: Backbone) -> str:
        """Who decodes ``backbone``'s JPEGs: ``"workers"`` or ``"device"`` (``"auto"`` means the workers,
        until device decoding has been measured on a GPU)."""
        return "device" if self.decode == "device" and isinstance(backbone, ImageBackbone) else "workers"


_LOADING: contextvars.ContextVar[Loading] = contextvars.ContextVar("lpft_loading", default=Loading())


@contextlib.contextmanager
def loading(workers: int | None = None, skip_bad_images: bool = False, decode: str = "auto",
            device: torch.device | str | None = None) -> Iterator[Loading]:
    """Read every split inside the block with ``workers`` processes (default: the cores available),
    JPEGs decoded as ``decode`` says, on ``device`` under ``"device"`` (default: the CPU); see :class:`Loading`."""
    if workers is not None and workers < 0:
        raise TaskError(f"workers (--workers) must be 0 or more; got {workers}")
    if decode not in DECODE_MODES:
        raise TaskError(f"decode (--decode) must be one of {list(DECODE_MODES)}; got {decode!r}")
    settings = Loading(available_cores() if workers is None else workers, skip_bad_images, decode,
                       torch.device("cpu" if device is None else device))
    token = _LOADING.set(settings)
    try:
        yield settings
    finally:
        _LOADING.reset(token)


def current_loading() -> Loading:
    return _LOADING.get()


_Read = torch.Tensor | EncodedJpeg | str  # a row as a worker returns it: pixels, JPEG bytes, or an error


class _Rows(Dataset):
    """Rows of an image split, each decoded and transformed alone; indexed by ``(row, epoch)``.

    With ``read_jpegs`` (``decode="device"``), a JPEG the device can decode is only read, and
    returned as its bytes. Never raises for a bad image: it returns the error text, so the
    main process can name the file cleanly (an exception from a worker arrives wrapped in the
    worker's traceback).
    """

    def __init__(self, split: Split, backbone: ImageBackbone, train: bool, seed: int, read_jpegs: bool) -> None:
        self.inputs = split.inputs
        self.transform = backbone.image_transform(train)
        self.seeded = train and backbone.augment != "none"
        self.seed = seed
        self.read_jpegs = read_jpegs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, _Read]:
        row, epoch = key
        try:
            item = self.inputs[row]
            if isinstance(item, np.ndarray):
                return row, self._transformed(item, row, epoch)
            jpeg = read_jpeg(item) if self.read_jpegs else None
            return row, jpeg if jpeg is not None else self._transformed(load_rgb(item), row, epoch)
        except Exception as exc:  # noqa: BLE001 - PIL and decoders raise many types; reported by the caller
            return row, f"{type(exc).__name__}: {exc}"

    def _transformed(self, image: np.ndarray, row: int, epoch: int) -> torch.Tensor:
        if not self.seeded:
            return self.transform(image)
        with _seeded(self.seed, epoch, row):
            return self.transform(image)


@contextlib.contextmanager
def _seeded(seed: int, epoch: int, row: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` (what timm's transforms draw from) for one example."""
    state = np.random.SeedSequence([seed, epoch, row]).generate_state(2)
    saved = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(state[0]))
        random.seed(int(state[1]))
        try:
            yield
        finally:
            random.setstate(saved)


_Collated = tuple[torch.Tensor, torch.Tensor | list[torch.Tensor | EncodedJpeg] | None, dict[int, str]]


def _collate(items: list[tuple[int, _Read]]) -> _Collated:
    """Rows read, their stacked tensors, and the rows that failed with their errors.

    When JPEG bytes are among them (``decode="device"``) the rows' reads stay a list, for the
    main process to decode and stack (:meth:`SplitData._on_device`).
    """
    good = [(row, x) for row, x in items if not isinstance(x, str)]
    bad = {row: x for row, x in items if isinstance(x, str)}
    rows = torch.tensor([row for row, _ in good], dtype=torch.long)
    if any(isinstance(x, EncodedJpeg) for _, x in good):
        return rows, [x for _, x in good], bad
    return rows, torch.stack([x for _, x in good]) if good else None, bad


class _Plan:
    """The batch sampler a persistent DataLoader re-reads each pass: the caller's batches, with the epoch."""

    def __init__(self, batches: list[list[tuple[int, int]]] | None = None) -> None:
        self.batches = batches or []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class SplitData:
    """A split ready to be batched: held preprocessed in memory when small, else streamed by workers.

    ``train`` marks the split fine-tuning trains on: with an augmenting backbone
    (``augment="paper"``) its batches are augmented, seeded by ``seed``, and it is always
    streamed. Every other split is read as evaluation sees it. Under ``decode="device"``
    (:class:`Loading`) streamed batches come on the loading's device, and a preloaded split is
    decoded there once and held on the host like any other.
    """

    def __init__(self, backbone: Backbone, split: Split, train: bool = False, seed: int = 0,
                 preload: bool | None = None) -> None:
        self.backbone = backbone
        self.split = split
        self.loading = current_loading()
        self.augmented = train and isinstance(backbone, ImageBackbone) and backbone.augment != "none"
        self.decode = self.loading.decoder(backbone)
        self._train, self._seed = train, seed
        self._loader: DataLoader | None = None
        self._plan = _Plan()
        if preload is None:
            preload = not self.augmented and (backbone.modality == "text" or self._estimated_bytes() <= PRELOAD_LIMIT_BYTES)
        if preload and self.augmented:
            raise ValueError("an augmented training split cannot be preprocessed once: its batches differ every epoch")
        self._tensors: Batch | None = self._preprocess_all() if preload else None

    def _preprocess_all(self) -> Batch | None:
        """Every row preprocessed, in order: texts and in-memory images here, image files by workers.

        ``None`` when a training image was skipped (rows would no longer line up): then batches stream.
        """
        split = self.split
        chunks = [np.arange(i, min(i + PRELOAD_CHUNK, len(split))) for i in range(0, len(split), PRELOAD_CHUNK)]
        if self.backbone.modality == "text" or isinstance(split.inputs, np.ndarray):
            return _concat([self.backbone.preprocess(self._inputs(c)) for c in chunks])
        read = [(rows, batch.cpu()) for rows, batch in self._stream(chunks, epoch=0, keep_workers=False)]
        if sum(len(rows) for rows, _ in read) < len(split):
            return None
        return _concat([batch for _, batch in read])

    def __len__(self) -> int:
        return len(self.split)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.split.labels)

    @property
    def preloaded(self) -> bool:
        return self._tensors is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the preprocessed tensors (0 when batches are streamed)."""
        if self._tensors is None:
            return 0
        tensors = self._tensors.values() if isinstance(self._tensors, dict) else [self._tensors]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def device(self) -> torch.device:
        """Where rows are indexed: a preloaded split's device (see :meth:`to`), else the CPU."""
        if self._tensors is None:
            return torch.device("cpu")
        return next(iter(self._tensors.values())).device if isinstance(self._tensors, dict) else self._tensors.device

    def to(self, device: torch.device | str) -> SplitData:
        """Hold a preloaded split on ``device`` so batches are sliced there, with no per-step host copy."""
        if self._tensors is not None:
            self._tensors = to_device(self._tensors, device)
        return self

    def batches(self, indices: Sequence[np.ndarray | torch.Tensor], epoch: int = 0) -> Iterator[tuple[torch.Tensor, Batch]]:
        """``(rows, batch)`` for each index array in ``indices``, in order; ``rows`` are those read.

        ``rows`` equals the index array unless a training image could not be read under
        ``skip_bad_images`` (then it lacks that row). ``epoch`` seeds augmentation.
        """
        if self._tensors is None:
            yield from self._stream(indices, epoch)
            return
        for index in indices:
            t = torch.as_tensor(index, device=self.device)
            yield t, ({k: v[t] for k, v in self._tensors.items()} if isinstance(self._tensors, dict) else self._tensors[t])

    def batch(self, index: np.ndarray | torch.Tensor, epoch: int = 0) -> Batch:
        """One batch of the rows ``index`` (read in this process when streamed)."""
        if self._tensors is not None:
            return next(self.batches([index], epoch))[1]
        rows = [int(i) for i in torch.as_tensor(index).tolist()]
        dataset = self._dataset(self.decode == "device")
        _, tensors, bad = self._on_device(*_collate([dataset[(row, epoch)] for row in rows]), epoch)
        self._check(bad)
        return tensors

    def _stream(self, indices: Sequence[np.ndarray | torch.Tensor], epoch: int,
                keep_workers: bool = True) -> Iterator[tuple[torch.Tensor, Batch]]:
        """Batches read by workers; ``keep_workers=False`` for a single pass (preloading) lets them exit after it."""
        plan = _Plan([[(int(i), epoch) for i in torch.as_tensor(index).tolist()] for index in indices])
        if not plan.batches:
            return
        if keep_workers:  # the persistent loader re-reads its sampler each pass
            self._plan.batches = plan.batches
        loader = self._data_loader() if keep_workers else self._new_loader(plan, persistent=False)
        for read in loader:
            rows, tensors, bad = self._on_device(*read, epoch)
            self._check(bad)
            if tensors is None:
                raise TaskError(f"no image of a batch of {self.split.name} ({self.split.source}) could be read, the "
                                f"first {self.split.locate(next(iter(bad)))}; `lpft data check` lists every bad image")
            yield rows, tensors

    def _check(self, bad: dict[int, str]) -> None:
        """Stop on a bad image, naming it; or, for a training split under ``skip_bad_images``, count and go on."""
        if not bad:
            return
        row, error = next(iter(bad.items()))
        if not (self._train and self.loading.skip_bad_images):
            if self._train:
                hint = "`lpft data check` lists every bad image; --skip-bad-images leaves bad training images out"
            elif self.loading.skip_bad_images:
                hint = "only training images are skipped: remove it (`lpft data check` lists every bad image)"
            else:
                hint = "remove it (`lpft data check` lists every bad image)"
            raise TaskError(f"cannot read {self.split.name} image {self.split.locate(row)}: {error}; {hint}")
        skipped = self.loading.skipped.setdefault(self.split.name, [])
        for row, error in bad.items():
            where = self.split.locate(row)
            if where not in skipped:
                skipped.append(where)
                log.warning("skipping unreadable training image %s: %s", where, error)

    def _on_device(self, rows: torch.Tensor, images: torch.Tensor | list[torch.Tensor | EncodedJpeg] | None,
                   bad: dict[int, str], epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, str]]:
        """A collated batch with its JPEGs decoded and transformed on the loading's device, and stacked there.

        Only under ``decode="device"`` (otherwise the workers stacked it). A JPEG the device
        fails to decode is read as a worker reads it under ``decode="workers"``, so a bad image
        is named, or skipped, exactly as there.
        """
        if not isinstance(images, list):
            return rows, images, bad
        assert isinstance(self.backbone, ImageBackbone), "only image splits are decoded"
        device = self.loading.device
        decoded = iter(decode_jpegs([x for x in images if isinstance(x, EncodedJpeg)], device))
        kept, tensors, bad = [], [], dict(bad)
        for row, image in zip(rows.tolist(), images):
            if isinstance(image, EncodedJpeg):
                pixels = next(decoded)
                if pixels is None:
                    image = self._dataset(read_jpegs=False)[(row, epoch)][1]
                elif self.augmented:
                    with _seeded(self._seed, epoch, row):
                        image = self.backbone.transform_tensor(pixels, train=True)
                else:
                    image = self.backbone.transform_tensor(pixels, self._train)
            if isinstance(image, str):
                bad[row] = image
            else:
                kept.append(row)
                tensors.append(image.to(device))
        return torch.tensor(kept, dtype=torch.long), torch.stack(tensors) if tensors else None, bad

    def _dataset(self, read_jpegs: bool) -> _Rows:
        assert isinstance(self.backbone, ImageBackbone), "only image splits are streamed"
        return _Rows(self.split, self.backbone, self._train, self._seed, read_jpegs)

    def _data_loader(self) -> DataLoader:
        """One DataLoader per split, its workers kept alive across epochs and evaluations."""
        if self._loader is None:
            self._loader = self._new_loader(self._plan, persistent=True)
        return self._loader

    def _new_loader(self, plan: _Plan, persistent: bool) -> DataLoader:
        workers = self.loading.workers
        if not persistent:  # one pass: no more workers than batches, and none for one batch (nothing to overlap)
            workers = 0 if len(plan) == 1 else min(workers, len(plan))
        return DataLoader(
            self._dataset(self.decode == "device"), batch_sampler=plan, num_workers=workers, collate_fn=_collate,
            pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0,
            prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        )

    def _inputs(self, index: np.ndarray) -> Sequence:
        inputs = self.split.inputs
        return inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]

    def _estimated_bytes(self) -> int:
        size = getattr(self.backbone, "image_size", 224)
        return len(self.split) * 3 * size * size * 4


def to_device(batch: Batch, device: torch.device | str, channels_last: bool = False) -> Batch:
    """Move a batch to ``device``; host tensors bound for CUDA go through pinned memory so the copy is asynchronous."""
    device = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and t.device.type == "cpu":
            t = t.pin_memory()
        t = t.to(device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return move(batch)


def _concat(chunks: list[Batch]) -> Batch:
    if isinstance(chunks[0], dict):  # tokenised text: pad every chunk to the longest one
        longest = max(c["input_ids"].shape[1] for c in chunks)
        return {
            k: torch.cat([torch.nn.functional.pad(c[k], (0, longest - c[k].shape[1])) for c in chunks])
            for k in chunks[0]
        }
    return torch.cat(chunks)
