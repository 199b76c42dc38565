"""Training throughput and model FLOP utilisation: plain fp32 eager vs the fast path.

Models (random weights, synthetic data resident on the device, full fwd+bwd+optimizer step):
``resnet50`` and ``vit_b16`` (timm definitions, 224 px, ImageNet 1000-way head, SGD / AdamW),
and the two CPU targets of lpft's own loop, ``lite0-64`` (EfficientNet-Lite0 at 64 px) and
``minilm-l6`` (128 tokens); those two need lpft's packages and run from the source tree.

Configurations: ``fp32`` is plain eager fp32 (TF32 off, contiguous layout, foreach optimiser);
``fast`` is, on CUDA, bf16 autocast + channels_last + torch.compile + fused optimiser + TF32
for what stays fp32; on CPU it is the set that measured faster there (see CPU_FAST).
``--levers`` adds one configuration per single lever. FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (fwd+bwd, matmuls and convolutions); MFU divides
achieved FLOP/s by the device's dense bf16 peak (table below, or ``--peak-tflops``) for every
row, fp32 rows included, so rows compare on one scale.

Timing: warmup steps (compilation included) are excluded; CUDA is synchronised around every
timed window; configurations are measured in interleaved rounds and the median is reported,
so drift on a shared machine hits every configuration alike. Process CPU-seconds per
example are reported too (wall time on a shared CPU says more about the neighbours).

``--compile-mode`` defaults to torch's ``default``: ``max-autotune-no-cudagraphs`` searches
GEMM/conv configurations for several minutes per model and gains a few percent on these
models; it is there for longer runs.

GPU (finishes in about 4 minutes on one H100/H200, compilation included)::

    python benchmarks/train_throughput.py --json train_throughput.json

CPU (this repository's 2-core machine)::

    python benchmarks/train_throughput.py --device cpu --levers --json cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("train_throughput")
SRC = Path(__file__).resolve().parents[1] / "src"

# Dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
]


@dataclass(frozen=True)
class Levers:
    """One configuration of the speed levers."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    fused: bool = False
    tf32: bool = False


FP32 = Levers("fp32")
GPU_FAST = Levers("fast", bf16=True, channels_last=True, compile=True, fused=True, tf32=True)
# On this AVX2-only CPU bf16 matmuls are ~70x slower than fp32, so the CPU fast path is
# channels_last (CNNs) + compile + fused optimiser; lpft's loop leaves compile off on CPU by
# default because compiling takes minutes there.
CPU_FAST = Levers("fast", channels_last=True, compile=True, fused=True)


@dataclass
class Row:
    model: str
    config: str
    device: str
    batch_size: int
    examples_per_s: float
    cpu_s_per_example: float
    step_ms: float
    gflop_per_step: float
    achieved_tflops: float
    mfu: float | None
    speedup: float = 1.0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(model: str, device: torch.device, batch: int) -> tuple[nn.Module, object, torch.Tensor, str]:
    """(model, synthetic input resident on device, labels, optimiser kind)."""
    gen = torch.Generator().manual_seed(0)
    if model in ("resnet50", "vit_b16"):
        import timm

        net = timm.create_model("resnet50" if model == "resnet50" else "vit_base_patch16_224", num_classes=1000)
        x = torch.randn(batch, 3, 224, 224, generator=gen)
        y = torch.randint(0, 1000, (batch,), generator=gen)
        return net.to(device), x.to(device), y.to(device), "sgd" if model == "resnet50" else "adamw"
    sys.path.insert(0, str(SRC))
    from lpft.backbones import create_backbone
    from lpft.training import Classifier

    y = torch.randint(0, 8, (batch,), generator=gen).to(device)
    if model == "lite0-64":
        net = Classifier(create_backbone("efficientnet-lite0", image_size=64), 8)
        return net.to(device), torch.randn(batch, 3, 64, 64, generator=gen).to(device), y, "sgd"
    if model == "minilm-l6":
        net = Classifier(create_backbone("minilm-l6"), 8)
        ids = torch.randint(1000, 30000, (batch, 128), generator=gen)
        x = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        return net.to(device), x, y, "adamw"
    raise SystemExit(f"unknown model {model!r}")


def make_step(net: nn.Module, x, y: torch.Tensor, opt_kind: str, lv: Levers, device: torch.device,
              compile_mode: str) -> Callable[[], None]:
    """A closure running one training step of ``net`` under the levers ``lv``."""
    import copy

    net = copy.deepcopy(net).train()
    if lv.channels_last and isinstance(x, torch.Tensor):
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    fused = True if lv.fused else None
    if opt_kind == "sgd":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=fused)
    fwd = torch.compile(net, mode=None if compile_mode == "default" else compile_mode) if lv.compile else net
    cuda = device.type == "cuda"

    def step() -> None:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = lv.tf32
            torch.backends.cudnn.allow_tf32 = lv.tf32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=lv.bf16):
            logits = fwd(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def count_flops(net: nn.Module, x, y: torch.Tensor) -> float:
    """FLOPs of one fwd+bwd step (eager fp32), as counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    import copy

    net = copy.deepcopy(net).train()
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(net(x).float(), y).backward()
    return float(counter.get_total_flops())


def time_window(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def bench_model(model: str, device: torch.device, configs: list[Levers], args: argparse.Namespace) -> list[Row]:
    batch = args.batch_size or (256 if device.type == "cuda" else {"lite0-64": 64, "minilm-l6": 8}.get(model, 8))
    net, x, y, opt_kind = build(model, device, batch)
    flops = count_flops(net, x, y)
    steps = {c.name: make_step(net, x, y, opt_kind, c, device, args.compile_mode) for c in configs}
    del net
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        log.info("%s %s: warmup %.1fs", model, name, time.perf_counter() - start)
    wall: dict[str, list[float]] = {c.name: [] for c in configs}
    cpu: dict[str, list[float]] = {c.name: [] for c in configs}
    for _ in range(args.repeats):  # interleaved rounds
        for name, step in steps.items():
            w, c = time_window(step, args.steps, device)
            wall[name].append(w)
            cpu[name].append(c)
    peak = peak_tflops(device, args.peak_tflops)
    rows = []
    for c in configs:
        w = statistics.median(wall[c.name]) / args.steps
        tflops = flops / w / 1e12
        rows.append(Row(model, c.name, str(device), batch, batch / w, statistics.median(cpu[c.name]) / args.steps / batch,
                        1e3 * w, flops / 1e9, tflops, tflops / peak if peak else None))
    base = rows[0].examples_per_s
    for r in rows:
        r.speedup = r.examples_per_s / base
    return rows


LOOP_TASKS = {  # (task, backbone, options, method hyperparameters) of lpft's real loop on CPU
    "lite0-64": ("emoji-styles", "efficientnet-lite0", {"image_size": 64}, {"lr": 3e-3, "batch_size": 32}),
    "minilm-l6": (str(SRC.parent / "examples" / "text-topics" / "task.yaml"), "minilm-l6", {}, {"lr": 1e-2, "batch_size": 16}),
}


def bench_loop(model: str, epochs: int) -> list[dict]:
    """lpft's own FT loop on a real task: fp32 eager (every lever off) vs the defaults ("auto")."""
    sys.path.insert(0, str(SRC))
    from lpft.backbones import create_backbone
    from lpft.data import load_task
    from lpft.runs import run_method
    from lpft.training import FinetuneConfig

    task_name, backbone_name, options, hyper = LOOP_TASKS[model]
    task, backbone = load_task(task_name), create_backbone(backbone_name, **options)
    plain = dict(precision="fp32", channels_last="off", compile="off", fused_optimizer=False)
    out = []
    for name, levers in (("fp32", plain), ("auto", {})):
        config = FinetuneConfig(epochs=epochs, eval_all_splits_each_epoch=False, **hyper, **levers)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        record, _ = run_method(task, backbone, "ft", config, torch.device("cpu"))
        out.append({"model": model, "config": name, "task": task.name, "epochs": epochs,
                    "fit_seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0,
                    "accuracy": {k: round(v["accuracy"], 4) for k, v in record.metrics.items()}})
        print(json.dumps(out[-1]), flush=True)
    return out


def lever_configs(device: torch.device, levers: bool) -> list[Levers]:
    fast = GPU_FAST if device.type == "cuda" else CPU_FAST
    configs = [FP32]
    if levers:
        configs += [Levers("+bf16", bf16=True), Levers("+channels_last", channels_last=True),
                    Levers("+compile", compile=True), Levers("+fused", fused=True)]
        if device.type == "cuda":
            configs.append(Levers("+tf32", tf32=True))
        else:
            configs.append(Levers("+channels_last+fused", channels_last=True, fused=True))
    return configs + [fast]


def print_table(rows: list[Row]) -> None:
    head = f"{'model':<10} {'config':<18} {'batch':>5} {'ex/s':>9} {'x fp32':>7} {'cpu-s/ex':>9} {'step ms':>9} {'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "    -"
        print(f"{r.model:<10} {r.config:<18} {r.batch_size:>5} {r.examples_per_s:>9.1f} {r.speedup:>6.2f}x "
              f"{r.cpu_s_per_example:>9.4f} {r.step_ms:>9.1f} {r.gflop_per_step:>11.1f} {r.achieved_tflops:>8.3f} {mfu:>6}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--models", default=None,
                   help="comma-separated from resnet50, vit_b16, lite0-64, minilm-l6 "
                        "(default: resnet50,vit_b16 on CUDA; lite0-64,minilm-l6 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA; 64 (lite0-64) or 8 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per timed window (default 10 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 3 CUDA, 2 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows per configuration (default 3)")
    p.add_argument("--levers", action="store_true", help="also time each lever alone")
    p.add_argument("--configs", default=None,
                   help="comma-separated subset of configuration names to run (e.g. skip +bf16 on a CPU without native bf16)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: the device table)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--loop", action="store_true",
                   help="CPU: time lpft's FT loop on a real task (emoji-styles / text-topics), fp32 eager vs auto, with accuracy")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the --loop runs")
    p.add_argument("--json", type=Path, default=None, help="write rows and environment here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup or (3 if cuda else 2)
    args.repeats = args.repeats or 3
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    models = (args.models or ("resnet50,vit_b16" if cuda else "lite0-64,minilm-l6")).split(",")
    if args.loop:
        loops = [row for model in models for row in bench_loop(model, args.epochs)]
        if args.json:
            args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "runs": loops}, indent=2))
        return 0
    configs = lever_configs(device, args.levers)
    if args.configs:
        keep = args.configs.split(",")
        configs = [c for c in configs if c.name in keep]
    rows: list[Row] = []
    for model in models:
        rows += bench_model(model, device, configs, args)
        print_table(rows)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "compile_mode": args.compile_mode,
           "peak_tflops": peak_tflops(device, args.peak_tflops), "steps": args.steps, "repeats": args.repeats}
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
