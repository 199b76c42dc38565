"""One FT/LP-FT run across processes with PyTorch DDP, launched by ``torchrun``.

The same code path serves one process and many: outside ``torchrun`` every helper here is
a no-op (rank 0 of a world of 1). Under ``torchrun --nproc_per_node N`` the process group
is initialised on first use from torchrun's environment (``nccl`` for CUDA, ``gloo`` for
CPU), each process takes the GPU of its local rank, the training loop shards every global
batch across ranks and DDP all-reduces gradients. Evaluation is sharded and gathered, so
every rank ends with the same logits and selects the same epoch; only rank 0 writes output.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0, or the only process; readable before the process group exists (for output gating)."""
    return int(os.environ.get("RANK", "0")) == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun an unindexed ``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def context(device: torch.device | None = None) -> DistContext:
    """The process group of this run, initialised on first use from torchrun's environment."""
    if not launched_by_torchrun():
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        atexit.register(_destroy)
        log.info("DDP: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return DistContext(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous part of ``range(n)`` (parts differ in size by at most one)."""
    return slice(ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size)


def gather_rows(part: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenate every rank's rows in rank order; every rank receives the whole array."""
    if not ctx.enabled:
        return part
    parts: list[np.ndarray | None] = [None] * ctx.world_size
    dist.all_gather_object(parts, part)
    return np.concatenate(parts)


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of ``value`` over ranks (in place), unchanged in one process."""
    if ctx.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
