"""JPEGs decoded on the training device (``--decode device``): the workers only read their bytes.

A worker that reads a JPEG which the device decodes to the same pixels as PIL (:func:`read_jpeg`)
hands on its bytes instead of pixels; the main process decodes the batch's JPEGs in one
:func:`torchvision.io.decode_jpeg` call on the device (nvjpeg on CUDA; on the CPU
libjpeg-turbo, as PIL) and transforms them there
(:meth:`~lpft.backbones.base.ImageBackbone.transform_tensor`). Every other image (PNG, arrays
in memory, greyscale or CMYK JPEGs, files cut short) is decoded by the worker with PIL, as
with ``--decode workers``. On a CPU this only moves the decoding into the main process: the
point is CUDA, where decoding leaves the CPU cores that would otherwise bound the input rate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lpft.data.images import FileRange, InlineImage

_START = b"\xff\xd8\xff"  # start-of-image marker and the first byte of the next marker
_END = b"\xff\xd9"
_DECODED_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # Huffman-coded baseline, extended and progressive frames
# Every other start-of-frame marker (lossless, hierarchical, arithmetic-coded), and start-of-scan:
# a scan before any frame header is malformed. 0xC4, 0xC8 and 0xCC are not frames.
_REFUSED = (frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xDA}


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, read by a worker for the main process to decode on the device."""

    data: bytearray


def read_jpeg(item: Path | FileRange | InlineImage | str) -> EncodedJpeg | None:
    """The bytes of ``item`` when :func:`device_decodable`, else ``None``: the caller decodes it with PIL."""
    data = bytearray(Path(item).read_bytes() if isinstance(item, (Path, str)) else item.open().read())
    return EncodedJpeg(data) if device_decodable(data) else None


def device_decodable(data: bytes | bytearray) -> bool:
    """Whether ``data`` is a complete 8-bit, three-component Huffman-coded JPEG.

    Those nvjpeg decodes, and torchvision's CPU decoder turns into PIL's exact RGB. Greyscale
    and CMYK JPEGs (which nvjpeg handles partly or not at all), 12-bit, lossless or
    arithmetic-coded ones, and files without their end marker (cut short: PIL refuses them,
    naming the problem) are left to PIL.
    """
    if not (data.startswith(_START) and data.endswith(_END)):
        return False
    pos = 2
    while pos + 9 < len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
        elif marker in _DECODED_FRAMES:  # FF Cn, length (2), precision (1), height (2), width (2), components (1)
            return data[pos + 4] == 8 and data[pos + 9] == 3
        elif marker in _REFUSED:
            return False
        else:  # a segment before the frame header (APPn, DQT, DHT, ...): skip it by its length
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def decode_jpegs(jpegs: list[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 RGB ``[3, H, W]`` on ``device`` for each JPEG, decoded in one batched call; ``None``
    for one that fails to decode (the caller hands it to PIL, which decodes it or names what is wrong)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not jpegs:
        return []
    encoded = [torch.frombuffer(jpeg.data, dtype=torch.uint8) for jpeg in jpegs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's (torchcodec.decoders.decode_jpeg,
        # the same call), which this environment lacks; every call would warn
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, device=device, mode=ImageReadMode.RGB))
        except RuntimeError:  # one bad image fails the whole call: decode them one by one to find it
            decoded: list[torch.Tensor | None] = []
            for one in encoded:
                try:
                    decoded.append(decode_jpeg(one, device=device, mode=ImageReadMode.RGB))
                except RuntimeError:
                    decoded.append(None)
            return decoded
