"""One training loop for FT and LP-FT: they differ only in how the head starts.

Everything else (optimiser, cosine schedule, BatchNorm mode, epoch selection on ID
validation) is shared, so a comparison of FT and LP-FT isolates the head initialisation.

The loop has switchable fast paths (bf16 autocast, channels_last, torch.compile, fused
optimisers, device-resident data, pinned transfers). ``"auto"`` turns each on only where it
measured faster: see :func:`resolve_fast_path` and docs/scale.md. The same loop runs under
``torchrun`` as one DDP run (:mod:`lpft.training.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lpft.backbones.base import Batch
from lpft.data.loader import SplitData, to_device
from lpft.progress import progress_disabled
from lpft.data.splits import SELECTION_SPLIT
from lpft.errors import RunError
from lpft.training import checkpoint, distributed
from lpft.training.config import FinetuneConfig
from lpft.training.fastpath import FastPath, resolve_fast_path
from lpft.training.model import Classifier, set_batchnorm_mode

log = logging.getLogger(__name__)

DEVICE_DATA_FRACTION = 0.25  # hold splits on the GPU only while they take under this share of its free memory
# A batch loss this many times above the larger of log K (a uniform guess) and the first batch's is divergence.
DIVERGENCE_FACTOR = 100.0
CHECK_EVERY_CUDA = 50  # steps between divergence checks on a GPU (each check synchronises the device)


@dataclass
class FinetuneResult:
    """Per-epoch history and the selected epoch (the model holds its weights), and the speed levers used."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    logits: dict[str, np.ndarray] = field(default_factory=dict)
    fast_path: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[int, Classifier], None]
Penalty = Callable[[Classifier], torch.Tensor]  # a regulariser added to the batch loss (e.g. L2-SP)
OptimizerFactory = Callable[[Classifier, FinetuneConfig, FastPath], torch.optim.Optimizer]


@torch.inference_mode()
def predict_logits(
    model: Classifier, data: SplitData, device: torch.device, batch_size: int = 256, fast: FastPath | None = None,
    desc: str = "predict", progress: bool = True,
) -> np.ndarray:
    """Logits ``[N, C]`` (float32) for a whole split, in eval mode, batched under inference mode.

    ``fast`` applies the run's autocast and memory format (default: plain fp32). Under DDP
    every rank scores its shard and all ranks receive the whole array, so all must call this.
    With ``progress``, a bar named ``desc`` shows once scoring has taken more than a second.
    """
    ctx = distributed.context(device)
    part = distributed.shard(len(data), ctx)
    was_training = model.training
    model.eval()
    out = []
    channels_last = fast is not None and fast.channels_last
    with fast.autocast(device) if fast is not None else contextlib.nullcontext():
        indices = [np.arange(start, min(start + batch_size, part.stop)) for start in range(part.start, part.stop, batch_size)]
        for _, batch in tqdm(data.batches(indices), total=len(indices), desc=desc, unit="batch", leave=False, delay=1,
                             disable=progress_disabled(progress and ctx.is_main)):
            out.append(model(to_device(batch, device, channels_last)).float())
    model.train(was_training)
    logits = torch.cat(out).cpu().numpy() if out else np.zeros((0, model.head.out_features), np.float32)
    return distributed.gather_rows(logits, ctx)


def build_optimizer(model: Classifier, config: FinetuneConfig, fast: FastPath) -> torch.optim.Optimizer:
    """The configured SGD or AdamW over the backbone's trainable parameters and the head (one group)."""
    return optimizer_for(config, fast, list(model.backbone.trainable_parameters()) + list(model.head.parameters()))


def optimizer_for(config: FinetuneConfig, fast: FastPath, params: list) -> torch.optim.Optimizer:
    """The configured SGD or AdamW over ``params``: tensors, or param-group dicts (each may set its own ``lr``)."""
    fused = fast.fused_optimizer or None  # None lets torch pick its default (foreach) implementation
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _hold_on_device(splits: list[SplitData], device: torch.device) -> None:
    """Move preloaded splits to the GPU when together they fit in a modest share of its free memory."""
    preloaded = [d for d in splits if d.preloaded]
    needed = sum(d.nbytes for d in preloaded)
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= DEVICE_DATA_FRACTION * free:
        for d in preloaded:
            d.to(device)
    else:
        log.info("splits need %.1f GiB, more than %.0f%% of free GPU memory: batches stay on the host",
                 needed / 2**30, 100 * DEVICE_DATA_FRACTION)


def _first_step_compiled_or_eager(
    forward_backward: Callable[[Callable[..., torch.Tensor]], torch.Tensor],
    compiled: Callable[..., torch.Tensor],
    eager: nn.Module,
    model: nn.Module,
) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
    """The first step's loss through ``compiled``, or, if compiled code fails, through ``eager``.

    Returns the loss and the forward the rest of training should use. torch.compile has shipped
    bugs that only show when its generated code runs: on an H200 (torch 2.11), inductor's
    stride assertion in the backward of a 3x3 convolution fired for ResNet-18 at 32 px with
    channels_last. A run should then go on eagerly rather than die; an error that is not
    the compiler's recurs in the eager retry and propagates from there. The parameters are
    untouched (no optimiser step has run); the buffers the failed forward may have updated
    (BatchNorm statistics in ``bn_mode="train"``) are restored first. Not under DDP, whose
    reducer a half-run backward leaves expecting gradients: there the error propagates.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        return forward_backward(compiled), compiled
    except Exception as error:  # noqa: BLE001 - any failure of generated code; retried eagerly below
        log.warning("torch.compile failed on the first training step (%s: %s); training without it. "
                    "Pass compile='off' (CLI: --compile off) to skip compiling.",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        return forward_backward(eager), eager


def _local_share(index: torch.Tensor, ctx: distributed.DistContext) -> tuple[torch.Tensor, float]:
    """This rank's rows of a global batch and the weight that makes DDP's all-reduced gradient the global one.

    A last global batch smaller than the world leaves a rank no rows: it joins the all-reduce
    on one row with zero weight.
    """
    local = index[ctx.rank :: ctx.world_size]
    if len(local) == 0:
        return index[:1], 0.0
    return local, ctx.world_size / len(index)


def finetune(
    model: Classifier,
    train: SplitData,
    evals: Mapping[str, SplitData],
    config: FinetuneConfig,
    device: torch.device,
    before_step: StepCallback | None = None,
    progress: bool = True,
    penalty: Penalty | None = None,
    make_optimizer: OptimizerFactory = build_optimizer,
) -> FinetuneResult:
    """Train all parameters with a per-step cosine schedule; keep the epoch with best ID-val accuracy.

    The starting model is scored too, as epoch 0, and is a candidate like every epoch: when
    fine-tuning only hurts ID validation (LP-FT at too high a learning rate), the run keeps
    its start (for LP-FT, the linear probe) and says so with ``best_epoch == 0``. With
    ``config.eval_all_splits_each_epoch`` every split in ``evals`` is scored after each epoch
    (so later selection rules can use the history); ``evals`` must contain ``id_val``. On
    return the model holds the weights of the selected epoch and ``result.logits`` its
    logits on every split.

    A training loss that is not finite, or exceeds :data:`DIVERGENCE_FACTOR` times the larger
    of ``log K`` and the first batch's loss, stops the run with a :class:`~lpft.errors.RunError`
    naming the epoch, the step and the learning rate there (checked every step on CPU, every
    :data:`CHECK_EVERY_CUDA` steps on a GPU, so the device is not synchronised each step).

    Under torchrun (DDP) every rank draws the same permutation and takes every
    ``world_size``-th example of each global batch (DistributedSampler's split); the loss is
    scaled so the all-reduced gradient equals the single-process gradient of the global batch.

    Methods built on this loop change it through two hooks: ``penalty(model)``, a regulariser
    added to every batch's mean loss (L2-SP), and ``make_optimizer``, which chooses the
    parameters and their learning rates (layer-wise decay, surgical fine-tuning, adapters)
    and may return another optimiser (projection methods).

    Inside :func:`lpft.training.checkpoint.checkpointing` (``lpft run --checkpoint DIR``) the loop
    saves its whole state after every epoch and, given a checkpoint of the same run, restores it
    and continues after the saved epoch, ending exactly as the uninterrupted run would.
    """
    if SELECTION_SPLIT not in evals:
        raise ValueError(f"fine-tuning selects the epoch on {SELECTION_SPLIT!r}; it is missing from evals")
    ctx = distributed.context(device)
    fast = resolve_fast_path(config, model.backbone, device)
    result = FinetuneResult(fast_path=fast.describe())
    decoding = "" if model.backbone.modality != "image" else (
        f", JPEGs decoded on {train.loading.device}" if train.decode == "device" else ", images decoded by the workers")
    log.info("training on %s: %s%s", device, fast.summary(), decoding)
    model.to(device)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    if fast.data_on_device:
        _hold_on_device([train, *evals.values()], device)
    optimizer = make_optimizer(model, config, fast)
    # static_graph: some backbones hold parameters their features never use (BERT's pooler);
    # DDP learns the set once instead of searching the graph every step (find_unused_parameters)
    net: nn.Module = DistributedDataParallel(model, static_graph=True) if ctx.enabled else model
    forward = torch.compile(net) if fast.compile else net
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    generator = torch.Generator().manual_seed(config.seed)
    labels = train.labels.to(train.device)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    best_acc, best_state = -1.0, None
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first diverged step, kept on the device
    bad_loss = torch.zeros((), device=device)
    loss_limit: torch.Tensor | None = None
    check_every = CHECK_EVERY_CUDA if device.type == "cuda" else 1

    def lr_at(at: int) -> float:
        return config.lr * 0.5 * (1 + math.cos(math.pi * at / total_steps))

    def check_divergence() -> None:
        if distributed.all_reduce_sum((first_bad >= 0).float(), ctx).item() == 0:
            return
        at = int(first_bad) if int(first_bad) >= 0 else step - 1
        raise RunError(
            f"training diverged at epoch {at // steps_per_epoch + 1}, step {at + 1} of {total_steps}: batch loss "
            f"{float(bad_loss):.4g} (learning rate there {lr_at(at):.3g}, peak lr {config.lr:.3g}); lower --lr"
        )

    def keep_if_best(epoch: int, logits: dict[str, np.ndarray], accuracy: dict[str, float]) -> None:
        nonlocal best_acc, best_state
        if accuracy[SELECTION_SPLIT] > best_acc:  # strict: ties keep the earlier epoch (the start first)
            best_acc, result.best_epoch, result.logits = accuracy[SELECTION_SPLIT], epoch, logits
            best_state = copy.deepcopy(model.state_dict())

    def score(epoch: int, train_loss: float | None) -> None:
        tracked = evals if config.eval_all_splits_each_epoch else {SELECTION_SPLIT: evals[SELECTION_SPLIT]}
        logits = {k: predict_logits(model, d, device, config.eval_batch_size, fast,
                                 desc=f"evaluate {k}", progress=progress) for k, d in tracked.items()}
        accuracy = {k: float((v.argmax(1) == evals[k].split.labels).mean()) for k, v in logits.items()}
        result.history.append({"epoch": epoch, "train_loss": train_loss, "accuracy": accuracy})
        log.info("epoch %d/%d  loss %s  %s", epoch, config.epochs, "-" if train_loss is None else f"{train_loss:.4f}",
                 "  ".join(f"{k} {a:.4f}" for k, a in accuracy.items()))
        keep_if_best(epoch, logits, accuracy)

    def forward_backward(fwd: Callable[..., torch.Tensor], rows: torch.Tensor, batch: Batch, weight: float) -> torch.Tensor:
        """Loss of ``batch`` (the training ``rows``) and its gradients, scaled by ``weight`` (the DDP share); no step."""
        with fast.autocast(device):
            logits = fwd(to_device(batch, device, fast.channels_last))
        loss = loss_fn(logits.float(), to_device(labels[rows.to(labels.device)], device))
        optimizer.zero_grad(set_to_none=True)
        objective = loss * weight
        if penalty is not None:  # on the mean loss's scale; under DDP each rank adds its share
            objective = objective + penalty(model) * len(rows) * weight
        objective.backward()
        return loss

    resumed = checkpoint.resume(model, optimizer, schedule, generator, device, config.epochs)  # under --checkpoint
    if resumed is None:
        score(0, None)  # the starting model (LP-FT: the linear probe) is a candidate too
        step, first_epoch = 0, 1
    else:
        step, first_epoch = resumed.step, resumed.epoch + 1
        loss_limit, first_bad, bad_loss = resumed.loss_limit, resumed.first_bad, resumed.bad_loss
        best_acc, best_state = resumed.best_accuracy, resumed.best_state
        result.history, result.best_epoch, result.logits = resumed.history, resumed.best_epoch, resumed.logits
    bar = tqdm(total=total_steps, initial=step, desc="fine-tune", unit="step",
               disable=progress_disabled(progress and ctx.is_main), leave=False)
    for epoch in range(first_epoch, config.epochs + 1):
        net.train()
        set_batchnorm_mode(model, config.bn_mode)
        order = torch.randperm(len(train), generator=generator).to(train.device)
        total_loss = torch.zeros((), device=device)  # summed on device: no host sync per step
        plan = [_local_share(order[start : start + config.batch_size], ctx)
                for start in range(0, len(order), config.batch_size)]
        # the loader reads ahead (workers decode later batches while this one trains)
        for (_, weight), (rows, batch) in zip(plan, train.batches([local for local, _ in plan], epoch), strict=True):
            if before_step is not None:
                before_step(step, model)
            if step == 0 and forward is not net and not ctx.enabled:
                loss, forward = _first_step_compiled_or_eager(
                    lambda fwd: forward_backward(fwd, rows, batch, weight), forward, net, model)
            else:
                loss = forward_backward(forward, rows, batch, weight)
            batch_loss = loss.detach() / max(len(rows), 1)
            if loss_limit is None:
                loss_limit = DIVERGENCE_FACTOR * torch.clamp(batch_loss, min=math.log(model.head.out_features))
            bad = ~torch.isfinite(batch_loss) | (batch_loss > loss_limit)
            bad_loss = torch.where(bad & (first_bad < 0), batch_loss, bad_loss)
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            optimizer.step()
            schedule.step()
            step += 1
            total_loss += loss.detach() * (weight > 0)
            bar.update(1)
            if step % check_every == 0:
                check_divergence()
        check_divergence()
        train_loss = float(distributed.all_reduce_sum(total_loss, ctx)) / len(train)
        bar.set_postfix(epoch=epoch, loss=f"{train_loss:.3f}")
        score(epoch, train_loss)
        checkpoint.save(checkpoint.Progress(epoch, step, result.history, result.best_epoch, best_acc, best_state,
                                            result.logits, loss_limit, first_bad, bad_loss),
                        model, optimizer, schedule, generator, device)
    bar.close()
    model.load_state_dict(best_state)
    if fast.channels_last:
        model.to(memory_format=torch.contiguous_format)  # hand back the layout we were given
    model.eval()
    for key in evals.keys() - result.logits.keys():
        result.logits[key] = predict_logits(model, evals[key], device, config.eval_batch_size, fast,
                                            desc=f"evaluate {key}", progress=progress)
    return result
