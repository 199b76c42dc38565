"""The settings of one fine-tuning run (FT, LP-FT and every method built on the same loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lpft.config import MethodConfig, setting

SWITCH = ("auto", "on", "off")
# The paper's fine-tuning protocol: SGD with momentum 0.9, no weight decay, 20 epochs, batch 64
# (smaller for small tasks), BatchNorm frozen, and six learning rates from 3e-5 to 1e-2.
PAPER_FINETUNE: dict[str, Any] = {
    "epochs": 20, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "batch_size": "auto", "bn_mode": "frozen",
    "lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
}


def auto_batch_size(n_train: int) -> int:
    """The paper's 64, smaller for small tasks so an epoch has at least 10 steps (never below 8)."""
    return max(8, min(64, n_train // 10))


@dataclass
class FinetuneConfig(MethodConfig):
    """Hyperparameters of one fine-tuning run.

    ``bn_mode="frozen"`` (the default) keeps BatchNorm layers in eval mode: their running
    statistics stay the pretrained ones while their affine weights still train. This is
    the paper's LP-FT setting, applied here to FT as well so that the two differ only in
    the head. It is also what EfficientNet-Lite0 needs: its weights come with TF-style
    BatchNorm momentum (0.01 in PyTorch's convention), so in ``train`` mode the running
    statistics barely move during a short run while the network learns on batch
    statistics, and evaluation then sees statistics it was not trained with.

    Speed levers (results agree with fp32 eager up to rounding, bf16 within its precision):
    ``precision`` (autocast dtype), ``channels_last``, ``compile`` take ``"auto"``, which
    :func:`lpft.training.fastpath.resolve_fast_path` decides per device and backbone from
    measurements; ``fused_optimizer`` uses the single-kernel SGD/AdamW; ``data_on_device``
    keeps preprocessed splits on the GPU when they fit. Under DDP ``batch_size`` is the
    global batch.
    """

    epochs: int = setting(10, "training epochs (cosine schedule over all of them)", minimum=1)
    lr: float = setting(1e-3, "peak learning rate", above=0.0)
    optimizer: str = setting("sgd", "optimiser", choices=("sgd", "adamw"))
    momentum: float = setting(0.9, "SGD momentum", minimum=0.0)
    weight_decay: float = setting(0.0, "weight decay (decoupled for AdamW)", minimum=0.0)
    batch_size: int = setting(64, "batch size ('auto': 64, smaller for small tasks so an epoch has >= 10 steps)",
                              minimum=1, auto=auto_batch_size)
    bn_mode: str = setting("frozen", "BatchNorm during training, the same for FT and LP-FT", choices=("frozen", "train"))
    eval_batch_size: int = setting(256, "batch size for evaluation", minimum=1)
    eval_all_splits_each_epoch: bool = setting(
        True, "score every split after every epoch (the history later selection rules read), or only id_val")
    precision: str = setting("auto", "autocast dtype; auto: bf16 on CUDA, on CPU only where it measured faster",
                             choices=("auto", "fp32", "bf16"))
    channels_last: str = setting("auto", "channels_last memory format for image backbones (auto: on)", choices=SWITCH)
    compile: str = setting("auto", "torch.compile the training step (auto: on CUDA)", choices=SWITCH)
    fused_optimizer: bool = setting(True, "single-kernel SGD/AdamW")
    data_on_device: bool = setting(True, "keep preprocessed splits on the GPU when they fit")

    default_grid: ClassVar[dict[str, Any]] = PAPER_FINETUNE
