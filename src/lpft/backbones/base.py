"""The Backbone contract: a pretrained feature extractor with its own preprocessing.

Every adapter (bundled weights, timm, torchvision, Hugging Face) implements the same small
interface, so features, methods and diagnostics never special-case a model family:

- ``preprocess(inputs) -> Batch``: raw split inputs (images or strings) to model-ready CPU
  tensors. Deterministic, so a split can be preprocessed once and indexed afterwards.
- ``features(batch) -> Tensor[N, feature_dim]``: the representation a linear head reads.
- ``trainable_parameters()``: what fine-tuning updates.
- ``blocks()``: those parameters grouped by depth, input to output (layer-wise learning rates,
  surgical fine-tuning).
- ``fingerprint``: identifies weights and preprocessing, keying the feature cache.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from lpft.config import AUGMENT_PRESETS
from lpft.data.images import load_rgb
from lpft.errors import BackboneError

Batch = torch.Tensor | dict[str, torch.Tensor]
NamedParameters = list[tuple[str, nn.Parameter]]


class Block(NamedTuple):
    """Parameters at one depth of a backbone, e.g. a residual block or a transformer layer."""

    name: str
    parameters: list[nn.Parameter]


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

    def blocks(self) -> list[Block]:
        """The trainable parameters grouped into blocks in depth order, input to output, each exactly once.

        What layer-wise learning rates and surgical fine-tuning index by depth. The default
        (:func:`depth_blocks`) reads parameter names in registration order; an adapter whose
        model knows its own grouping, or registers parameters out of data-flow order, overrides it.
        """
        return depth_blocks(self.named_trainable_parameters())

    def named_trainable_parameters(self) -> NamedParameters:
        """``(name, parameter)`` for each of :meth:`trainable_parameters`, in registration order."""
        trainable = {id(p) for p in self.trainable_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) in trainable]


_NUMBERED = re.compile(r"(\d+|.*[_-]\d+)")  # ``3``, ``encoder_layer_3`` (torchvision ViT), ``block1-0`` (RegNet)


def block_name(parameter: str) -> str:
    """The block a parameter belongs to: its name up to the first numbered part (``layer1.0``,
    ``net._blocks.3``, ``encoder.layer.5``, ``encoder.layers.encoder_layer_5``), else its module
    (``net._conv_stem``)."""
    parts = parameter.split(".")
    for i, part in enumerate(parts[:-1]):
        if _NUMBERED.fullmatch(part):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parameter


def _numbered(parameter: str) -> bool:
    return any(_NUMBERED.fullmatch(part) for part in parameter.split(".")[:-1])


def depth_blocks(named: NamedParameters) -> list[Block]:
    """Parameters (in registration order, assumed to follow the data) grouped into depth-ordered blocks.

    Each numbered block (:func:`block_name`: ``layer1.0``, ``_blocks.3``, ``encoder.layer.5``)
    is a block; the unnumbered parameters before the first of them form one input block (stem
    convolution and its norm, embeddings), those after the last one an output block (head
    convolution, final norm, pooler), and any in between a block per module. Without numbered
    parts every module is a block.
    """
    numbered = [i for i, (name, _) in enumerate(named) if _numbered(name)]
    first, last = (numbered[0], numbered[-1]) if numbered else (-1, len(named))
    groups: dict[str, NamedParameters] = {}
    for i, (name, p) in enumerate(named):
        key = "<input>" if i < first else "<output>" if i > last else block_name(name)
        groups.setdefault(key, []).append((name, p))
    return name_blocks(list(groups.values()), [name for name, _ in named])


def name_blocks(groups: list[NamedParameters], all_names: list[str]) -> list[Block]:
    """:class:`Block` s from groups of named parameters, each named by its parameters.

    A group's name is the dotted prefix its parameters share (``net.layer1.0``,
    ``encoder.embeddings``) when that says more than the prefix every parameter shares
    (``net``); otherwise the :func:`block_name` of its parts joined by ``+`` (``net._conv_stem+net._bn0``).
    """
    root = _common_prefix(all_names)
    blocks = []
    for group in groups:
        names = [name for name, _ in group]
        shared = _common_prefix(names) if len(names) > 1 else block_name(names[0])
        if len(shared) <= len(root):
            shared = "+".join(dict.fromkeys(block_name(n) if len(block_name(n)) > len(root) else n for n in names))
        blocks.append(Block(shared, [p for _, p in group]))
    return blocks


def _common_prefix(names: list[str]) -> str:
    """The longest dotted prefix of all ``names`` (``""`` if none)."""
    parts = os.path.commonprefix([n.split(".") for n in names])
    return ".".join(parts)


CROP_PCT = 0.875  # the eval crop's share of the resized image, where a backbone's pretrained config gives none
# timm's interpolation names that torchvision's tensor kernels implement; the others (box, hamming,
# lanczos) fall back to bilinear when images are transformed on the device
TENSOR_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class ImageBackbone(Backbone):
    """Shared preprocessing for image models, by augmentation preset.

    - ``none`` (default): every image, in training and evaluation alike, is resized whole to
      ``image_size`` x ``image_size`` (bilinear, antialiased), scaled to [0, 1] and normalised.
    - ``paper``: the fine-tuning protocol of the LP-FT paper, built with timm's
      ``create_transform``: training batches of FT and LP-FT take a RandomResizedCrop (scale
      0.08-1) and a horizontal flip; evaluation and LP features resize the shorter side to
      ``image_size / crop_pct`` and take the centre crop, with the backbone's pretrained
      interpolation and crop share (:attr:`interpolation`, :attr:`crop_pct`).

    The preset is part of :attr:`preprocess_signature`, so features under one never serve another.
    Images decoded on the device (``--decode device``) take :meth:`transform_tensor`: the same
    preset in torch ops.
    """

    modality = "image"
    interpolation = "bilinear"  # timm's name of the resize kernel of ``paper``'s transforms
    crop_pct = CROP_PCT

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.augment = "none"
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def set_augment(self, preset: str) -> None:
        """Choose the augmentation preset (:data:`AUGMENT_PRESETS`)."""
        if preset not in AUGMENT_PRESETS:
            raise BackboneError(f"augment (--augment) must be one of {list(AUGMENT_PRESETS)}; got {preset!r}")
        self.augment = preset

    @property
    def preprocess_signature(self) -> str:
        mean = [round(v, 6) for v in self._mean.flatten().tolist()]
        std = [round(v, 6) for v in self._std.flatten().tolist()]
        if self.augment == "none":
            return f"bilinear-resize={self.image_size};mean={mean};std={std}"
        return (f"augment={self.augment};{self.interpolation}-resize-crop={self.image_size};"
                f"crop_pct={self.crop_pct};mean={mean};std={std}")

    def image_transform(self, train: bool) -> Callable[[np.ndarray], torch.Tensor]:
        """One uint8 ``[H, W, 3]`` image -> float ``[3, S, S]``: training batches (``train``) or evaluation.

        Training transforms draw from torch's and Python's global generators; the loader seeds
        them per example (:mod:`lpft.data.loader`), so augmentation does not depend on workers.
        """
        if self.augment == "none":
            return self._resize_whole
        from timm.data import create_transform

        mean = tuple(self._mean.flatten().tolist())
        std = tuple(self._std.flatten().tolist())
        timm_transform = create_transform(
            input_size=self.image_size, is_training=train, interpolation=self.interpolation, mean=mean, std=std,
            crop_pct=self.crop_pct, scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
        )
        return _FromArray(timm_transform)

    def transform_tensor(self, image: torch.Tensor, train: bool) -> torch.Tensor:
        """:meth:`image_transform` in torch ops, for an image decoded on the device: uint8 ``[3, H, W]``
        -> float ``[3, S, S]``, on the image's device.

        ``none`` is the same computation as :meth:`image_transform`, so equal on the CPU. ``paper``
        draws the same kinds of crops and flips, from torch's global generator (the loader seeds it
        per example), but resamples with torchvision's tensor kernels instead of PIL's: its pixels
        differ slightly from :meth:`image_transform`'s.
        """
        mean, std = self._mean.to(image.device), self._std.to(image.device)
        if self.augment == "none":
            return ((self._resize(image[None]) - mean) / std)[0]
        from torchvision.transforms import InterpolationMode, RandomResizedCrop
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode(self.interpolation if self.interpolation in TENSOR_INTERPOLATIONS else "bilinear")
        size = [self.image_size, self.image_size]
        x = image.float().div_(255.0)
        if train:  # timm's RandomResizedCropAndInterpolation (scale 0.08-1, ratio 3/4-4/3), then a flip half the time
            top, left, height, width = RandomResizedCrop.get_params(x, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
            x = F.resized_crop(x, top, left, height, width, size, interpolation=mode, antialias=True)
            if torch.rand(1) < 0.5:
                x = F.horizontal_flip(x)
        else:  # timm's evaluation transform: the shorter side to floor(S / crop_pct), then the centre S x S
            x = F.resize(x, [math.floor(self.image_size / self.crop_pct)], interpolation=mode, antialias=True)
            x = F.center_crop(x, size)
        return (x.clamp_(0.0, 1.0) - mean[0]) / std[0]  # clamped as PIL's uint8 result is (bicubic overshoots)

    def preprocess(self, inputs: Sequence | np.ndarray) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` arrays or image files (read by :func:`~lpft.data.images.load_rgb`) -> float
        ``[N, 3, S, S]``, as evaluation sees them."""
        if isinstance(inputs, np.ndarray) and self.augment == "none":  # one interpolate call for the whole array
            x = self._resize(torch.from_numpy(np.ascontiguousarray(inputs)).permute(0, 3, 1, 2))
            return (x - self._mean.cpu()) / self._std.cpu()
        transform = self.image_transform(train=False)
        return torch.stack([transform(img if isinstance(inputs, np.ndarray) else load_rgb(img)) for img in inputs])

    def _resize_whole(self, image: np.ndarray) -> torch.Tensor:
        x = self._resize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None])
        return ((x - self._mean.cpu()) / self._std.cpu())[0]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return x


class _FromArray:
    """A PIL-image transform (timm's) applied to a uint8 array; a class, not a closure, so workers can pickle it."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(Image.fromarray(image))


class PooledImageBackbone(ImageBackbone):
    """An image network ``self.net`` whose forward already returns pooled features (no classifier)."""

    net: nn.Module
    _weights_id: str

    def _identify_weights(self, weights: str) -> None:
        """Key the feature cache on the weights file's digest, or on the weights themselves (random/download)."""
        self._weights_id = file_digest(weights) if Path(str(weights)).is_file() else digest_state_dict(self.net.state_dict())

    @property
    def fingerprint(self) -> str:
        return f"{self.name}|{self._weights_id}|{self.preprocess_signature}"

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)


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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise BackboneError(f"{path} is not a readable .safetensors file ({exc}); save the weights again") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise BackboneError(
            f"{path} cannot be read as tensors alone ({type(exc).__name__}); lpft never unpickles other Python "
            "objects, which could run code. Save the weights with torch.save(model.state_dict(), PATH) or as "
            ".safetensors (safetensors.torch.save_file)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state
