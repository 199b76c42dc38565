"""Feature extraction, cached on disk, and split data held ready for training.

Features are keyed by the backbone's fingerprint (weights digest and preprocessing), a
digest of the split's inputs and, under ``--decode device``, the JPEG decoder, so a second
LP run, or the LP stage of LP-FT, reads them from disk instead of running the backbone again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from lpft.backbones.base import Backbone, Batch
from lpft.data.loader import SplitData, current_loading, to_device
from lpft.data.images import input_identity
from lpft.data.task import Split
from lpft.paths import atomic_target, cache_dir, remove_stale_temps, write_atomic
from lpft.progress import progress_disabled

log = logging.getLogger(__name__)

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


def feature_cache_key(backbone: Backbone, split: Split, decoder: str = "") -> str:
    """The cache entry of ``split``'s features under ``backbone``; ``decoder`` names a JPEG decoder
    other than the workers' PIL (``--decode device``), whose pixels may differ: its features are kept apart."""
    key = f"format={CACHE_FORMAT}\n{backbone.fingerprint}\n{split_digest(split)}"
    if decoder:
        key += f"\ndecoder={decoder}"
    return hashlib.sha256(key.encode()).hexdigest()


@torch.inference_mode()
def compute_features(
    backbone: Backbone, data: SplitData, device: torch.device | str = "cpu", batch_size: int = 256, desc: str = "",
    out: np.ndarray | _NpyAppender | None = None,
) -> np.ndarray | _NpyAppender:
    """Features ``[N, D]`` (float32) of every example, in order, with the backbone in eval mode.

    Written into ``out`` when given (the cache file's writer: memory then stays one batch deep
    however many rows there are). On a GPU each batch's copy to the host overlaps the
    next batch's forward pass.
    """
    was_training = backbone.training
    backbone.eval()
    cuda = torch.device(device).type == "cuda"
    channels_last = backbone.modality == "image"  # faster on cuDNN and oneDNN alike (finetune.resolve_fast_path)
    out = np.empty((len(data), backbone.feature_dim), dtype=FEATURE_DTYPE) if out is None else out
    indices = [np.arange(s, min(s + batch_size, len(data))) for s in range(0, len(data), batch_size)]
    pending: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None] | None = None

    def store(rows: torch.Tensor, feats: torch.Tensor, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        out[rows.numpy()] = feats.numpy()

    try:
        for rows, batch in tqdm(data.batches(indices), total=len(indices), desc=desc or "features", unit="batch",
                                leave=False, disable=progress_disabled()):
            feats = backbone.features(to_device(batch, device, channels_last)).float()
            if cuda:  # copy asynchronously into pinned memory; store it after the next batch is queued
                host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(feats, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                if pending is not None:
                    store(*pending)
                pending = (rows.cpu(), host, event)
            else:
                store(rows, feats, None)
        if pending is not None:
            store(*pending)
    finally:
        backbone.train(was_training)
    return out


def cached_features(
    backbone: Backbone,
    split: Split,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    cache: bool = True,
) -> np.ndarray:
    """Features of ``split`` under ``backbone``, read from the disk cache or computed and stored.

    An entry is ``<key>.npy`` plus a ``<key>.json`` sidecar recording its shape, dtype and the
    sha256 of the array bytes. It is extracted straight into a temporary file, batch by batch,
    that one rename makes the entry, and returned memory-mapped (copy-on-write): features far
    larger than RAM are never held whole. A read entry is verified against the sidecar and the
    expected ``[len(split), feature_dim]`` float32; one that is truncated, unreadable, or whose
    shape, dtype or checksum differs is logged as a warning with its path and rebuilt.
    """
    shape = (len(split), backbone.feature_dim)
    if not cache:
        return compute_features(backbone, SplitData(backbone, split), device, batch_size, desc=f"features {split.name}")
    reading = current_loading()
    decoder = f"decode_jpeg:{reading.device.type}" if reading.decoder(backbone) == "device" else ""
    key = feature_cache_key(backbone, split, decoder)
    path = cache_dir() / "features" / key[:2] / f"{key}.npy"
    remove_stale_temps(path.parent)
    feats = _read_entry(path, shape)
    if feats is not None:
        log.debug("feature cache hit %s (%s, %s)", path, backbone.name, split.name)
        return feats
    data = SplitData(backbone, split)  # only now: a small split is decoded whole when this is built
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            compute_features(backbone, data, device, batch_size, desc=f"features {split.name}", out=_NpyAppender(f, shape))
        meta = {
            "backbone": backbone.name,
            "fingerprint": backbone.fingerprint,
            "split": split.name,
            "source": split.source,
            "shape": list(shape),
            "dtype": FEATURE_DTYPE.name,
            "sha256": _file_checksum(tmp, shape, FEATURE_DTYPE),
        }
        write_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    log.debug("cached features of %s (%d x %d) at %s", split.name, *shape, path)
    return np.load(path, mmap_mode="c")


class _NpyAppender:
    """A ``.npy`` file written row block by row block, in order (``out[rows] = values``).

    Plain writes rather than a writable memory map: dirty pages of a map count in the process's
    resident memory until written back, so extracting N x D features would grow it by the
    whole file; written this way it grows by one batch.
    """

    def __init__(self, file: BinaryIO, shape: tuple[int, int]) -> None:
        self.file, self.shape, self.rows = file, shape, 0
        np.lib.format.write_array_header_1_0(file, {"descr": FEATURE_DTYPE.str, "fortran_order": False, "shape": shape})

    def __setitem__(self, rows: np.ndarray, values: np.ndarray) -> None:
        if len(rows) and (rows[0] != self.rows or rows[-1] != self.rows + len(rows) - 1):
            raise ValueError(f"rows must arrive in order: expected {self.rows}.., got {rows[0]}..")
        self.file.write(np.ascontiguousarray(values, dtype=FEATURE_DTYPE).data)
        self.rows += len(rows)


def _file_checksum(path: Path, shape: tuple[int, ...], dtype: np.dtype, chunk: int = 1 << 24) -> str:
    """sha256 of a ``.npy`` file's data bytes, read in chunks (page cache, not this process's memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _read_header(f, shape, dtype)
        remaining = int(np.prod(shape)) * dtype.itemsize
        buffer = bytearray(min(chunk, max(remaining, 1)))
        while remaining:
            read = f.readinto(memoryview(buffer)[: min(len(buffer), remaining)])
            if not read:
                raise ValueError(f"truncated: {remaining} data bytes missing")
            h.update(memoryview(buffer)[:read])
            remaining -= read
        if f.read(1):
            raise ValueError("bytes follow the data")
    return h.hexdigest()


def _read_entry(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The verified cache entry at ``path``, memory-mapped; ``None`` when missing or (logged) damaged."""
    if not path.is_file():
        return None
    try:
        checksum = _file_checksum(path, shape, FEATURE_DTYPE)
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    else:
        problem = _sidecar_problem(meta, shape, checksum)
    if problem is None:
        return np.load(path, mmap_mode="c")
    log.warning("feature cache entry %s is damaged (%s); recomputing it", path, problem)
    return None


def _read_header(f: BinaryIO, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Read a ``.npy`` header, which must say ``shape`` and ``dtype`` (checked before any data is read)."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    got_shape, fortran_order, got_dtype = read_header(f)
    if (got_shape, got_dtype, fortran_order) != (shape, dtype, False):
        order = " in Fortran order" if fortran_order else ""
        raise ValueError(f"its header says {got_dtype} {got_shape}{order}, expected {dtype} {shape}")


def _sidecar_problem(meta: object, shape: tuple[int, int], checksum: str) -> str | None:
    """What in the ``.json`` sidecar disagrees with the ``.npy`` (its shape and data checksum), or ``None``."""
    if not isinstance(meta, dict):
        return "its .json sidecar is not an object"
    if meta.get("shape") != list(shape) or meta.get("dtype") != FEATURE_DTYPE.name:
        return (
            f"its .json sidecar records {meta.get('dtype')} {meta.get('shape')}, "
            f"the .npy holds {FEATURE_DTYPE.name} {list(shape)}"
        )
    if meta.get("sha256") != checksum:
        return "its contents do not match the sha256 recorded in its .json sidecar"
    return None
