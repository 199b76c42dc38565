"""Feature extraction, cached on disk, and split data held ready for training.

Features are keyed by the backbone's fingerprint (weights digest and preprocessing) and a
digest of the split's inputs, so a second LP run, or the LP stage of LP-FT, reads them
from disk instead of running the backbone again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lpft.backbones.base import Backbone, Batch
from lpft.data.images import input_identity
from lpft.data.task import Split
from lpft.paths import cache_dir, remove_stale_temps, write_atomic

log = logging.getLogger(__name__)

PRELOAD_LIMIT_BYTES = 1 << 30  # preprocess a split up front when its tensors fit in 1 GiB
# Part of every cache key. Bump when entries or the reading of inputs change: 2 added the
# checksummed sidecar and the 16-bit and alpha-aware image decoding of data.images.load_rgb.
CACHE_FORMAT = 2
FEATURE_DTYPE = np.dtype(np.float32)


def split_digest(split: Split) -> str:
    """sha256 over a split's inputs: array bytes, texts, or each image's :func:`~lpft.data.images.input_identity`."""
    h = hashlib.sha256()
    inputs = split.inputs
    if isinstance(inputs, np.ndarray):
        h.update(f"{inputs.shape}{inputs.dtype}".encode())
        h.update(np.ascontiguousarray(inputs).tobytes())
    else:
        for item in inputs:
            if isinstance(item, str):
                h.update(item.encode("utf-8") + b"\x00")
            else:
                h.update(f"{input_identity(item)}\n".encode())
    return h.hexdigest()


def feature_cache_key(backbone: Backbone, split: Split) -> str:
    key = f"format={CACHE_FORMAT}\n{backbone.fingerprint}\n{split_digest(split)}"
    return hashlib.sha256(key.encode()).hexdigest()


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


class SplitData:
    """A split ready to be batched: preprocessed once when small, else preprocessed per batch."""

    def __init__(self, backbone: Backbone, split: Split, preload: bool | None = None, chunk: int = 512) -> None:
        self.backbone = backbone
        self.split = split
        if preload is None:
            preload = backbone.modality == "text" or self._estimated_bytes() <= PRELOAD_LIMIT_BYTES
        self._tensors: Batch | None = None
        if preload:
            chunks = [backbone.preprocess(self._inputs(np.arange(i, min(i + chunk, len(split))))) for i in range(0, len(split), chunk)]
            self._tensors = _concat(chunks)

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
        """Bytes of the preprocessed tensors (0 when batches are preprocessed on demand)."""
        if self._tensors is None:
            return 0
        tensors = self._tensors.values() if isinstance(self._tensors, dict) else [self._tensors]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def device(self) -> torch.device:
        """Where :meth:`batch` returns tensors (CPU unless :meth:`to` moved a preloaded split)."""
        if self._tensors is None:
            return torch.device("cpu")
        return next(iter(self._tensors.values())).device if isinstance(self._tensors, dict) else self._tensors.device

    def to(self, device: torch.device | str) -> SplitData:
        """Hold a preloaded split on ``device`` so batches are sliced there, with no per-step host copy."""
        if self._tensors is not None:
            self._tensors = to_device(self._tensors, device)
        return self

    def batch(self, index: np.ndarray | torch.Tensor) -> Batch:
        if self._tensors is None:
            return self.backbone.preprocess(self._inputs(np.asarray(index)))
        t = torch.as_tensor(index, device=self.device)
        if isinstance(self._tensors, dict):
            return {k: v[t] for k, v in self._tensors.items()}
        return self._tensors[t]

    def _inputs(self, index: np.ndarray) -> Sequence:
        inputs = self.split.inputs
        return inputs[index] if isinstance(inputs, np.ndarray) else [inputs[i] for i in index]

    def _estimated_bytes(self) -> int:
        size = getattr(self.backbone, "image_size", 224)
        return len(self.split) * 3 * size * size * 4


def _concat(chunks: list[Batch]) -> Batch:
    if isinstance(chunks[0], dict):  # tokenised text: pad every chunk to the longest one
        longest = max(c["input_ids"].shape[1] for c in chunks)
        return {
            k: torch.cat([torch.nn.functional.pad(c[k], (0, longest - c[k].shape[1])) for c in chunks])
            for k in chunks[0]
        }
    return torch.cat(chunks)


def progress_disabled(wanted: bool = True) -> bool | None:
    """tqdm's ``disable=`` for lpft's bars: ``True`` when the caller wants none or ``TQDM_DISABLE`` is set
    (``lpft --no-progress`` sets it), else ``None``: tqdm draws the bar only on a terminal.

    Passing ``disable`` at all overrides tqdm's own reading of ``TQDM_DISABLE``, hence the check here.
    """
    return True if not wanted or os.environ.get("TQDM_DISABLE") else None


@torch.inference_mode()
def compute_features(
    backbone: Backbone, data: SplitData, device: torch.device | str = "cpu", batch_size: int = 256, desc: str = ""
) -> np.ndarray:
    """Features ``[N, D]`` (float32) of every example, in order, with the backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    cuda = torch.device(device).type == "cuda"
    channels_last = backbone.modality == "image"  # faster on cuDNN and oneDNN alike (finetune.resolve_fast_path)
    shape = (len(data), backbone.feature_dim)
    # pinned output lets the device->host copies run asynchronously, with one synchronisation at the end
    out = torch.empty(shape, dtype=torch.float32, pin_memory=cuda and shape[0] * shape[1] * 4 <= PRELOAD_LIMIT_BYTES)
    try:
        for start in tqdm(range(0, len(data), batch_size), desc=desc or "features", unit="batch", leave=False,
                          disable=progress_disabled()):
            index = np.arange(start, min(start + batch_size, len(data)))
            batch = to_device(data.batch(index), device, channels_last)
            out[start : start + len(index)].copy_(backbone.features(batch), non_blocking=True)
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        backbone.train(was_training)
    return out.numpy()


def cached_features(
    backbone: Backbone,
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    cache: bool = True,
) -> np.ndarray:
    """Features of ``split`` under ``backbone``, read from the disk cache or computed and stored.

    An entry is ``<key>.npy`` plus a ``<key>.json`` sidecar recording its shape, dtype and the
    sha256 of the array bytes. A read entry is verified against the sidecar and the expected
    ``[len(split), feature_dim]`` float32; one that is truncated, unreadable, or whose shape,
    dtype or checksum differs is logged as a warning with its path and rebuilt.
    """
    key = feature_cache_key(backbone, split)
    path = cache_dir() / "features" / key[:2] / f"{key}.npy"
    if cache:
        remove_stale_temps(path.parent)
        feats = _read_entry(path, (len(split), backbone.feature_dim))
        if feats is not None:
            log.debug("feature cache hit %s (%s, %s)", path, backbone.name, split.name)
            return feats
    feats = compute_features(backbone, SplitData(backbone, split), device, batch_size, desc=f"features {split.name}")
    if cache:
        meta = {
            "backbone": backbone.name,
            "fingerprint": backbone.fingerprint,
            "split": split.name,
            "source": split.source,
            "shape": list(feats.shape),
            "dtype": feats.dtype.name,
            "sha256": _checksum(feats),
        }
        write_atomic(path, lambda f: np.save(f, feats))
        write_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
        log.debug("cached features of %s (%d x %d) at %s", split.name, *feats.shape, path)
    return feats


def _checksum(feats: np.ndarray) -> str:
    """sha256 of the array bytes: ~1.5 GB/s with SHA extensions, a fraction of reading the file."""
    return hashlib.sha256(np.ascontiguousarray(feats).data).hexdigest()


def _read_entry(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The verified cache entry at ``path``; ``None`` when missing or (logged) damaged."""
    if not path.is_file():
        return None
    try:
        feats = _read_npy(path, shape, FEATURE_DTYPE)
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    else:
        problem = _sidecar_problem(meta, feats)
    if problem is None:
        return feats
    log.warning("feature cache entry %s is damaged (%s); recomputing it", path, problem)
    return None


def _read_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A ``.npy`` whose header must say ``shape`` and ``dtype``, with exactly that many data bytes.

    The header is checked before any data is read, so a garbage header cannot ask for a huge array.
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran_order, got_dtype = read_header(f)
        if (got_shape, got_dtype, fortran_order) != (shape, dtype, False):
            order = " in Fortran order" if fortran_order else ""
            raise ValueError(f"its header says {got_dtype} {got_shape}{order}, expected {dtype} {shape}")
        data = bytearray(int(np.prod(shape)) * dtype.itemsize)
        read = f.readinto(data)
        if read != len(data):
            raise ValueError(f"truncated: {read} of {len(data)} data bytes")
        if f.read(1):
            raise ValueError(f"bytes follow the {len(data)} data bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _sidecar_problem(meta: object, feats: np.ndarray) -> str | None:
    """What in the ``.json`` sidecar disagrees with ``feats``, or ``None``."""
    if not isinstance(meta, dict):
        return "its .json sidecar is not an object"
    if meta.get("shape") != list(feats.shape) or meta.get("dtype") != feats.dtype.name:
        return (
            f"its .json sidecar records {meta.get('dtype')} {meta.get('shape')}, "
            f"the .npy holds {feats.dtype.name} {list(feats.shape)}"
        )
    if meta.get("sha256") != _checksum(feats):
        return "its contents do not match the sha256 recorded in its .json sidecar"
    return None
