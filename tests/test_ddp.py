"""One FT run across two CPU processes (torchrun, gloo) matches the same run in one process.

The model is a tiny timm network with random weights and no dropout or stochastic depth,
and BatchNorm is frozen (the default), so every rank computes exactly what the single
process computes on its share of each global batch; only the order of floating-point
sums differs. (MiniLM's dropout and EfficientNet's drop-connect draw per-rank random masks:
such runs are valid DDP training but not bit-comparable to one process.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from lpft.backbones import create_backbone
from lpft.methods import create_method
from lpft.runs import run_method

from conftest import small_digits_task

TESTS = Path(__file__).resolve().parent
# 50 training examples in global batches of 16: the last global batch (2) leaves one example per rank
CONFIG = dict(epochs=2, lr=0.05, batch_size=16, optimizer="sgd", seed=0, compile="off")

WORKER = textwrap.dedent(
    f"""
    import sys, numpy as np, torch
    sys.path.insert(0, {str(TESTS)!r})
    torch.set_num_threads(1)
    from conftest import small_digits_task
    from lpft.backbones import create_backbone
    from lpft.training.distributed import context, is_main_process
    from lpft.methods import create_method
    from lpft.runs import resolve_device, run_method

    torch.manual_seed(0)  # the random backbone weights, as in the single-process run
    backbone = create_backbone("timm:test_resnet", weights="random", image_size=32)
    record, result = run_method(small_digits_task(per_split=25), backbone, create_method("ft", {CONFIG!r}),
                                resolve_device("cpu"))
    ctx = context()
    assert ctx.world_size == 2, ctx
    head = result.model.head.weight.detach().numpy()
    np.savez(sys.argv[1] + f"/rank{{ctx.rank}}.npz", head=head, epoch=result.selected["epoch"],
             **{{k: v for k, v in result.logits.items()}})
    """
)


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, cache):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # one thread per process: on a busy 2-core machine, OpenMP threads waiting for each other at
    # every op's barrier made this tiny network 100x slower
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = create_backbone("timm:test_resnet", weights="random", image_size=32)
    _, single = run_method(small_digits_task(per_split=25), backbone, create_method("ft", CONFIG), torch.device("cpu"))

    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    worst = max(np.abs(ranks[0][k] - single.logits[k]).max() / np.abs(single.logits[k]).max() for k in single.logits)
    print(f"DDP vs one process: max |logit difference| / max |logit| = {worst:.2e}")
    for key in ("id_val", "id_test", "ood/inverted"):
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])  # gathered: every rank holds the same logits
        np.testing.assert_allclose(ranks[0][key], single.logits[key], rtol=1e-4, atol=1e-4 * np.abs(single.logits[key]).max())
    np.testing.assert_allclose(ranks[0]["head"], single.model.head.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert int(ranks[0]["epoch"]) == single.selected["epoch"]
