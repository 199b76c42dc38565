"""One training loop for FT and LP-FT: they differ only in how the head starts.

Everything else (optimiser, cosine schedule, BatchNorm mode, epoch selection on ID
validation) is shared, so a comparison of FT and LP-FT isolates the head initialisation.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lpft.backbones.base import Backbone, Batch
from lpft.features import SplitData, to_device

log = logging.getLogger(__name__)

BatchNormMode = Literal["frozen", "train"]
SELECTION_SPLIT = "id_val"


@dataclass
class FinetuneConfig:
    """Hyperparameters of one fine-tuning run (FT or LP-FT).

    ``bn_mode="frozen"`` (the default) keeps BatchNorm layers in eval mode: their running
    statistics stay the pretrained ones while their affine weights still train. This is
    the paper's LP-FT setting, applied here to FT as well so that the two differ only in
    the head. It is also what EfficientNet-Lite0 needs: its weights come with TF-style
    BatchNorm momentum (0.01 in PyTorch's convention), so in ``train`` mode the running
    statistics barely move during a short run while the network learns on batch
    statistics, and evaluation then sees statistics it was not trained with.
    """

    epochs: int = 10
    lr: float = 1e-3
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    bn_mode: BatchNormMode = "frozen"
    seed: int = 0
    eval_batch_size: int = 256
    # Score every split after every epoch (the history later selection rules and reports
    # read), or only id_val, scoring the rest once for the selected epoch (faster).
    eval_all_splits_each_epoch: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.bn_mode not in ("frozen", "train"):
            raise ValueError(f"bn_mode must be 'frozen' or 'train', got {self.bn_mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """A backbone followed by a linear head on its features."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.backbone.features(batch))

    def set_head(self, weight: np.ndarray | torch.Tensor, bias: np.ndarray | torch.Tensor) -> None:
        """Start from a given head, e.g. the linear probe's (LP-FT)."""
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight, dtype=self.head.weight.dtype))
            self.head.bias.copy_(torch.as_tensor(bias, dtype=self.head.bias.dtype))


@dataclass
class FinetuneResult:
    """Per-epoch history and the selected epoch; the model holds the selected weights."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    logits: dict[str, np.ndarray] = field(default_factory=dict)


StepCallback = Callable[[int, Classifier], None]


def set_batchnorm_mode(model: nn.Module, mode: BatchNormMode) -> None:
    """Put BatchNorm layers in eval mode when ``mode == "frozen"`` (call after ``model.train()``)."""
    if mode == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


@torch.inference_mode()
def predict_logits(model: Classifier, data: SplitData, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, C]`` for a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        index = np.arange(start, min(start + batch_size, len(data)))
        out.append(model(to_device(data.batch(index), device)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def _optimizer(model: Classifier, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = list(model.backbone.trainable_parameters()) + list(model.head.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def finetune(
    model: Classifier,
    train: SplitData,
    evals: Mapping[str, SplitData],
    config: FinetuneConfig,
    device: torch.device,
    before_step: StepCallback | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train all parameters with a per-step cosine schedule; keep the epoch with best ID-val accuracy.

    With ``config.eval_all_splits_each_epoch`` every split in ``evals`` is scored after each
    epoch (so later selection rules can use the history); ``evals`` must contain ``id_val``.
    On return the model holds the weights of the selected epoch and ``result.logits`` its
    logits on every split.
    """
    if SELECTION_SPLIT not in evals:
        raise ValueError(f"fine-tuning selects the epoch on {SELECTION_SPLIT!r}; it is missing from evals")
    model.to(device)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    generator = torch.Generator().manual_seed(config.seed)
    labels = train.labels
    loss_fn = nn.CrossEntropyLoss()
    result = FinetuneResult()
    best_acc, best_state = -1.0, None
    step = 0
    bar = tqdm(total=total_steps, desc="fine-tune", unit="step", disable=not progress, leave=False)
    for epoch in range(1, config.epochs + 1):
        model.train()
        set_batchnorm_mode(model, config.bn_mode)
        order = torch.randperm(len(train), generator=generator).numpy()
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            if before_step is not None:
                before_step(step, model)
            logits = model(to_device(train.batch(index), device))
            loss = loss_fn(logits, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            total_loss += loss.item() * len(index)
            seen += len(index)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total_loss / seen:.3f}")
        tracked = evals if config.eval_all_splits_each_epoch else {SELECTION_SPLIT: evals[SELECTION_SPLIT]}
        logits = {k: predict_logits(model, d, device, config.eval_batch_size) for k, d in tracked.items()}
        accuracy = {k: float((v.argmax(1) == evals[k].split.labels).mean()) for k, v in logits.items()}
        result.history.append({"epoch": epoch, "train_loss": total_loss / seen, "accuracy": accuracy})
        log.info("epoch %d/%d  loss %.4f  %s", epoch, config.epochs, total_loss / seen,
                 "  ".join(f"{k} {a:.4f}" for k, a in accuracy.items()))
        if accuracy[SELECTION_SPLIT] > best_acc:  # strict: ties keep the earlier epoch
            best_acc, result.best_epoch, result.logits = accuracy[SELECTION_SPLIT], epoch, logits
            best_state = copy.deepcopy(model.state_dict())
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    for key in evals.keys() - result.logits.keys():
        result.logits[key] = predict_logits(model, evals[key], device, config.eval_batch_size)
    return result
