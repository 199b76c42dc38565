"""The Backbone contract: a pretrained feature extractor with its own preprocessing.

Every adapter (bundled weights, timm, torchvision, Hugging Face) implements the same small
interface, so features, methods and diagnostics never special-case a model family:

- ``preprocess(inputs) -> Batch``: raw split inputs (images or strings) to model-ready CPU
  tensors. Deterministic, so a split can be preprocessed once and indexed afterwards.
- ``features(batch) -> Tensor[N, feature_dim]``: the representation a linear head reads.
- ``trainable_parameters()``: what fine-tuning updates.
- ``fingerprint``: identifies weights and preprocessing, keying the feature cache.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lpft.errors import BackboneError, TaskError

Batch = torch.Tensor | dict[str, torch.Tensor]


class Backbone(nn.Module, ABC):
    """A pretrained feature extractor; subclasses set ``name``, ``modality`` and ``feature_dim``."""

    name: str
    modality: str
    feature_dim: int

    @abstractmethod
    def preprocess(self, inputs: Sequence) -> Batch:
        """Turn raw inputs (uint8 images, image paths or strings) into a model-ready batch."""

    @abstractmethod
    def features(self, batch: Batch) -> torch.Tensor:
        """Features ``[N, feature_dim]`` of a preprocessed batch."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """A digest of weights and preprocessing: equal fingerprints give equal features."""

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.features(batch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that full fine-tuning updates (all of them unless an adapter says otherwise)."""
        return [p for p in self.parameters() if p.requires_grad]


class ImageBackbone(Backbone):
    """Shared preprocessing for image models: resize, scale to [0, 1], normalise per channel."""

    modality = "image"

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def preprocess_signature(self) -> str:
        mean = [round(v, 6) for v in self._mean.flatten().tolist()]
        std = [round(v, 6) for v in self._std.flatten().tolist()]
        return f"bilinear-resize={self.image_size};mean={mean};std={std}"

    def preprocess(self, inputs: Sequence | np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` arrays or image paths (read by :func:`_load_rgb`) -> float ``[N, 3, S, S]``."""
        if isinstance(inputs, np.ndarray):
            x = self._resize(torch.from_numpy(np.ascontiguousarray(inputs)).permute(0, 3, 1, 2))
        else:  # files may differ in size: resize one by one, then stack
            x = torch.cat([self._resize(torch.from_numpy(_load_rgb(p)).permute(2, 0, 1)[None]) for p in inputs])
        return (x - self._mean.cpu()) / self._std.cpu()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return x


class PooledImageBackbone(ImageBackbone):
    """An image network ``self.net`` whose forward already returns pooled features (no classifier)."""

    net: nn.Module
    _fingerprint: str

    def _set_fingerprint(self, weights: str) -> None:
        """Key the feature cache on the weights file's digest, or on the weights themselves (random/download)."""
        weights_id = file_digest(weights) if Path(str(weights)).is_file() else digest_state_dict(self.net.state_dict())
        self._fingerprint = f"{self.name}|{weights_id}|{self.preprocess_signature}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto: white, as a page shows them
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _load_rgb(path: Path | str) -> np.ndarray:
    """An image file as ``uint8`` RGB ``[H, W, 3]``; nothing is clipped, transparency is resolved.

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
    with Image.open(path) as img:
        if img.mode.startswith("I") or img.mode == "F":
            grey = _to_uint8(np.asarray(img), img.mode, path)
            return np.repeat(grey[..., None], 3, axis=-1)
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            background = Image.new("RGBA", img.size, (*BACKGROUND, 255))
            return np.asarray(Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")).copy()
        return np.asarray(img.convert("RGB")).copy()


def _to_uint8(values: np.ndarray, mode: str, path: Path | str) -> np.ndarray:
    """Greyscale samples of a high-bit-depth ``mode`` scaled (not clipped) to 0..255."""
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
            raise TaskError(
                f"image {path}: mode {mode} values span {low:g}..{high:g}, outside 0..65535; "
                "save it as an 8- or 16-bit image"
            )
        full_scale = next(s for s in ((1.0,) if mode == "F" else ()) + (255.0, 65535.0) if high <= s)
    return np.rint(values * (255.0 / full_scale)).astype(np.uint8)


def digest_state_dict(state: dict[str, torch.Tensor], extra: str = "") -> str:
    """A stable sha256 over parameter names, shapes and values (bytes), plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path | str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_weights_file(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state
