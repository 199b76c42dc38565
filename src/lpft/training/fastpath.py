"""Speed levers of the training loop, and how ``"auto"`` resolves them per device and backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lpft.backbones.base import Backbone
from lpft.training.config import FinetuneConfig


@dataclass(frozen=True)
class FastPath:
    """What the config's speed levers resolved to on this device and backbone."""

    autocast_dtype: torch.dtype | None  # None: plain fp32
    channels_last: bool
    compile: bool
    fused_optimizer: bool
    data_on_device: bool

    def summary(self) -> str:
        """The levers in one short human line."""
        levers = [(str(self.autocast_dtype).removeprefix("torch.") + " autocast") if self.autocast_dtype else "fp32"]
        levers += [name for name, on in (("channels_last", self.channels_last), ("compiled", self.compile),
                                         ("fused optimiser", self.fused_optimizer), ("data on device", self.data_on_device)) if on]
        return ", ".join(levers)

    def describe(self) -> dict[str, Any]:
        """The resolved levers as plain data (recorded with the run)."""
        return {"autocast": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32",
                "channels_last": self.channels_last, "compile": self.compile,
                "fused_optimizer": self.fused_optimizer, "data_on_device": self.data_on_device}

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them (e.g. AVX2-only CPUs) oneDNN's bf16 GEMM runs ~70x slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_fast_path(config: FinetuneConfig, backbone: Backbone, device: torch.device) -> FastPath:
    """Turn ``"auto"`` levers into choices, by device and backbone, following measurements (docs/scale.md).

    - bf16 autocast: on CUDA when supported; on CPU only for transformers (text) and only on
      CPUs with native bf16: depthwise convolutions (EfficientNet) lose with bf16 on any CPU,
      and on an AVX2-only CPU every bf16 matmul is far slower than fp32.
    - channels_last: image backbones, on CUDA (cuDNN's preferred layout) and on CPU (oneDNN:
      EfficientNet-Lite0 training at 64 px took ~1.3x fewer CPU-seconds per step).
    - torch.compile: CUDA only; on CPU its minutes of compilation outweigh its gain on short runs.
    """
    cuda = device.type == "cuda"
    image = backbone.modality == "image"
    if config.precision == "auto":
        if cuda:
            bf16 = torch.cuda.is_bf16_supported()
        else:
            bf16 = not image and cpu_has_native_bf16()
    else:
        bf16 = config.precision == "bf16"
    return FastPath(
        autocast_dtype=torch.bfloat16 if bf16 else None,
        channels_last=image and config.channels_last != "off",
        compile=cuda if config.compile == "auto" else config.compile == "on",
        fused_optimizer=config.fused_optimizer and device.type in ("cuda", "cpu"),
        data_on_device=config.data_on_device and cuda,
    )
