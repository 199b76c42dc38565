"""Image inputs of a split and how each becomes ``uint8`` RGB pixels.

A row of an image split is one of:

- a :class:`~pathlib.Path` to an image file (CSV ``path`` column, ImageFolder layout);
- a :class:`FileRange`: bytes at an offset inside a larger file (a member of a WebDataset tar
  shard, an image inside a saved Hugging Face dataset's Arrow file), read with one seek, so a
  shard is indexed once and never unpacked;
- an :class:`InlineImage`: encoded bytes held in memory (an image column of a Parquet file, or
  of a saved Hugging Face dataset whose Arrow file is compressed).

Every kind is cheap to pickle (DataLoader workers receive the split) and names itself in
errors through ``str()``. Nothing is decoded until :func:`load_rgb` runs, so loading a task
checks structure and existence only; ``lpft data check`` decodes everything.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image

from lpft.errors import TaskError


@dataclass(frozen=True)
class FileRange:
    """``size`` encoded bytes at ``offset`` in ``file``; ``name`` says where they came from (``shard.tar:key.jpg``)."""

    file: str
    offset: int
    size: int
    name: str

    def open(self) -> BinaryIO:
        with open(self.file, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.file} ends {self.size - len(data)} bytes before the image {self.name} does")
        return io.BytesIO(data)

    def identity(self) -> str:
        """What the feature cache keys this row on: the containing file's size and mtime, and the range."""
        stat = os.stat(self.file)
        return f"{os.path.realpath(self.file)}|{stat.st_size}|{stat.st_mtime_ns}|{self.offset}|{self.size}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class InlineImage:
    """Encoded image bytes held in memory; ``name`` says where they came from (``train.parquet, row 17``)."""

    data: bytes
    name: str

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)

    def identity(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def __str__(self) -> str:
        return self.name


ImageInput = Union[Path, FileRange, InlineImage]

# What a file's suffix must be for an ImageFolder file or a WebDataset member to count as an image:
# torchvision's IMG_EXTENSIONS, written out so that scanning a folder does not import torchvision.
IMAGE_SUFFIXES: tuple[str, ...] = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto: white, as a page shows them
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def open_image(item: ImageInput | str) -> Image.Image:
    """A PIL image of one row, not yet decoded (PIL reads pixels lazily)."""
    if isinstance(item, (FileRange, InlineImage)):
        return Image.open(item.open())
    return Image.open(item)


def load_rgb(item: ImageInput | str) -> np.ndarray:
    """An image as ``uint8`` RGB ``[H, W, 3]``; nothing is clipped, transparency is resolved.

    - 16-bit greyscale (modes ``I;16``, ``I;16B``, ...) is scaled to 8 bits, ``round(v * 255 / 65535)``.
    - Modes ``I`` (32-bit integer) and ``F`` (float) record no bit depth, so the full scale is the
      smallest of 1.0 (``F`` only), 255 and 65535 that holds the image's largest value; values that
      are negative, not finite or above 65535 are refused (:class:`TaskError`, naming the file).
    - Images with transparency (RGBA, LA, PA, or P / L / RGB with a transparent colour) are
      composited onto :data:`BACKGROUND` (white), so a transparent pixel reads as white rather
      than as whatever colour is stored under alpha 0.
    - Every other mode (1, L, P, RGB, CMYK, YCbCr, ...) is converted by PIL. 16-bit RGB(A) PNGs
      already open as 8-bit RGB(A), PIL keeping each sample's high byte.
    """
    with open_image(item) as img:
        if img.mode.startswith("I") or img.mode == "F":
            grey = _to_uint8(np.asarray(img), img.mode, item)
            return np.repeat(grey[..., None], 3, axis=-1)
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
            return np.asarray(Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")).copy()
        return np.asarray(img.convert("RGB")).copy()


def _to_uint8(values: np.ndarray, mode: str, item: object) -> np.ndarray:
    """Greyscale samples of a high-bit-depth ``mode`` scaled (not clipped) to 0..255."""
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
            raise TaskError(
                f"image {item}: mode {mode} values span {low:g}..{high:g}, outside 0..65535; "
                "save it as an 8- or 16-bit image"
            )
        full_scale = next(s for s in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0) if high <= s)
    return np.rint(values * (255.0 / full_scale)).astype(np.uint8)


def input_identity(item: object) -> str:
    """A string that changes when a row's content may have: a file's path, size and mtime; a text itself."""
    if isinstance(item, Path):
        stat = item.stat()
        return f"{item.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if isinstance(item, (FileRange, InlineImage)):
        return item.identity()
    return str(item)
