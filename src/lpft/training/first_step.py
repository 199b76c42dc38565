"""The first fine-tuning step, measured before it is taken: loss, head norm and gradient norms.

The paper's mechanism shows here: a random head (FT) gives a large loss and large gradients
into the backbone, so features move; the linear probe's head (LP-FT) starts near a minimum,
gradients are small and features barely move.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lpft.data.loader import SplitData, to_device
from lpft.training.config import FinetuneConfig
from lpft.training.model import Classifier, set_batchnorm_mode


def first_step_stats(
    model: Classifier, train: SplitData, config: FinetuneConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Loss and gradient norms at the first step, before any update, leaving the model as it was.

    Uses the first batch the training loop draws (the seeded permutation of
    :func:`lpft.training.finetune`), with the model in training mode and BatchNorm set as
    ``config.bn_mode``; stochastic layers (drop-connect) are seeded too. Gradients come from
    ``torch.autograd.grad`` so ``.grad`` fields stay untouched, and buffers the forward
    updates (BatchNorm statistics in ``train`` mode) are restored, so training afterwards
    is exactly what it would have been.
    """
    model.to(device)
    was_training = model.training
    buffers = [b.detach().clone() for b in model.buffers()]
    model.train()
    set_batchnorm_mode(model, config.bn_mode)
    batch_size = config.resolve(len(train)).batch_size
    index = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))[:batch_size].numpy()
    head = list(model.head.parameters())
    body = list(model.backbone.trainable_parameters())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            logits = model(to_device(train.batch(index, epoch=1), device))
        loss = nn.functional.cross_entropy(logits.float(), train.labels[index].to(device))
        grads = torch.autograd.grad(loss, head + body, allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)

    def norm(gs: Iterable[torch.Tensor | None]) -> float:
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None))

    return {
        "loss": float(loss.detach()),
        "grad_norm_head": norm(grads[: len(head)]),
        "grad_norm_backbone": norm(grads[len(head) :]),
        "grad_norm_total": norm(grads),
        "head_norm": float(model.head.weight.detach().norm()),
        "batch_size": len(index),
    }
