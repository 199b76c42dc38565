"""Linear probe speed and quality against the paper's sklearn protocol, in one process.

Reference protocol: features normalised by one scalar mean and std; sklearn
``LogisticRegression`` (lbfgs, L2), 50 C log-spaced in [1e-7, 1e2] in increasing order,
``warm_start=True``, ``max_iter=20``; the C with the best validation accuracy is kept.
The reference runs with BLAS pinned to one thread: in a process that has imported torch,
sklearn's BLAS threads otherwise spin against torch's and its CPU time balloons, which
would flatter the probe.

    python benchmarks/probe_speed.py                       # both synthetic cases
    python benchmarks/probe_speed.py --cases 512x10 --repeats 3
    python benchmarks/probe_speed.py --cases real                      # digits' cached Lite0 features
    python benchmarks/probe_speed.py --cases real --task emoji-styles --image-size 64
    python benchmarks/probe_speed.py --cases real --features cached.npz
    python benchmarks/probe_speed.py --grad-bench --device cuda
    python benchmarks/probe_speed.py --cases imagenet --device cuda --ref-repeats 0   # the whole C path

CPU-seconds (``time.process_time``) count every thread of the process, so the ratio
measures work saved, not parallelism. Medians over ``--repeats`` (the reference: over
``--ref-repeats``, default 1, since it is slow).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpft.probe import LinearProbe, resolve_device
from lpft.probe.solver import loss_and_grad
from lpft.probe.synthetic import make_features

SYNTHETIC = {
    "512x10": dict(d=512, k=10, rank=32, separation=0.6),
    "2048x100": dict(d=2048, k=100, rank=64, separation=0.8),
}


def bundled_features(task_name: str, backbone_name: str, image_size: int) -> dict[str, np.ndarray]:
    """A bundled benchmark's train / ID-val / ID-test features from lpft's feature cache
    (computed and cached on first use; not counted in the timings)."""
    from lpft.backbones.registry import create_backbone
    from lpft.data import load_task
    from lpft.features import cached_features

    task = load_task(task_name)
    backbone = create_backbone(backbone_name, image_size=image_size)
    out = {}
    for suffix, split in (("train", task.train), ("val", task.id_val), ("test", task.id_test)):
        out[f"X_{suffix}"] = cached_features(backbone, split, "cpu")
        out[f"y_{suffix}"] = np.asarray(split.labels)
    return out


def imagenet_case(folder: Path, n: int = 1_280_000, n_eval: int = 50_000, d: int = 2048, k: int = 1000,
                  chunk: int = 65_536) -> dict[str, np.ndarray]:
    """ImageNet-size features (``n`` x 2,048, 1,000 classes: class means plus noise) written to ``.npy``
    files chunk by chunk and opened memory-mapped, as lpft's feature cache hands them to the probe."""
    rng = np.random.default_rng(0)
    means = (0.06 * rng.standard_normal((k, d))).astype(np.float32)
    out: dict[str, np.ndarray] = {}
    for split, rows in (("train", n), ("val", n_eval), ("test", n_eval)):
        path = folder / f"X_{split}.npy"
        y = rng.integers(0, k, rows)
        X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d))
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            X[start:stop] = means[y[start:stop]] + rng.standard_normal((stop - start, d), dtype=np.float32)
        X.flush()
        del X
        out[f"X_{split}"], out[f"y_{split}"] = np.load(path, mmap_mode="c"), y
    return out


def load_case(name: str, args: argparse.Namespace) -> dict[str, np.ndarray]:
    if name == "imagenet":
        import tempfile

        return imagenet_case(Path(tempfile.mkdtemp(prefix="lpft-imagenet-features-")))
    if name == "real":
        if args.features is None:
            return bundled_features(args.task, args.backbone, args.image_size)
        with np.load(args.features) as z:
            return {key: z[key] for key in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")}
    spec = SYNTHETIC[name]
    return make_features(45_000, 5_000, 10_000, spec["d"], spec["k"], rank=spec["rank"],
                         separation=spec["separation"], seed=args.seed)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Result, CPU-seconds (all threads), wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def reference(data: dict[str, np.ndarray]) -> dict[str, float]:
    """The paper's protocol, measured as written (one BLAS thread; see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mu, sd = data["X_train"].mean(), data["X_train"].std()
    Z, Zv, Zt = ((data[k] - mu) / sd for k in ("X_train", "X_val", "X_test"))
    clf = LogisticRegression(warm_start=True, max_iter=20)
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 20-iteration cap is the protocol
        for C in np.logspace(-7, 2, 50):
            clf.set_params(C=C)
            clf.fit(Z, data["y_train"])
            acc = clf.score(Zv, data["y_val"])
            if best is None or acc > best[0]:
                best = (acc, C, clf.coef_.copy(), clf.intercept_.copy())
        assert best is not None
        clf.coef_, clf.intercept_ = best[2], best[3]
        return {"C": float(best[1]), "val_acc": float(best[0]), "test_acc": float(clf.score(Zt, data["y_test"]))}


def probe(data: dict[str, np.ndarray], device: str) -> dict[str, float]:
    p = LinearProbe(device=device).fit(data["X_train"], data["y_train"], data["X_val"], data["y_val"])
    return {
        "C": p.best_C_,
        "val_acc": p.val_accuracy_,
        "test_acc": p.score(data["X_test"], data["y_test"]),
        "fits": len(p.path_),
        "passes": p.n_passes_,
    }


def measure(fn: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    runs = [timed(fn) for _ in range(repeats)]
    out = dict(runs[-1][0])
    out["cpu_s"] = statistics.median(r[1] for r in runs)
    out["wall_s"] = statistics.median(r[2] for r in runs)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grad_bench(device: torch.device, n: int, d: int, k: int, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """ms per loss-and-gradient evaluation at n x d x k with features in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(n, d, device=device, dtype=dtype, generator=gen)
    y = torch.randint(0, k, (n,), device=device, generator=gen)
    W = 0.01 * torch.randn(d, k, device=device, dtype=torch.float32, generator=gen)
    b = torch.zeros(k, device=device)
    loss_and_grad(X, y, W, b)  # warm-up: kernels, allocator
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        loss_and_grad(X, y, W, b)
        sync(device)
        times.append(time.perf_counter() - start)
    ms = 1e3 * statistics.median(times)
    tflops = 4.0 * n * d * k / (ms / 1e3) / 1e12
    return {"n": n, "d": d, "k": k, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": tflops}


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'case':<10} {'method':<10} {'CPU s':>8} {'wall s':>8} {'C':>9} {'val acc':>8} {'test acc':>8} {'CPU ratio':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else ""
        print(f"{r['case']:<10} {r['method']:<10} {r['cpu_s']:>8.2f} {r['wall_s']:>8.2f} {r['C']:>9.3g} "
              f"{100 * r['val_acc']:>8.2f} {100 * r['test_acc']:>8.2f} {ratio:>9}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="512x10,2048x100",
                    help="comma list of 512x10, 2048x100, real, imagenet (1.28M x 2,048, 1,000 classes, memory-mapped)")
    ap.add_argument("--features", type=Path, help="case 'real': .npz with X_train,y_train,X_val,y_val,X_test,y_test "
                    "(default: a bundled benchmark's cached features, see --task)")
    ap.add_argument("--task", default="digits", help="case 'real' without --features: bundled benchmark (default digits)")
    ap.add_argument("--backbone", default="efficientnet-lite0", help="case 'real' without --features")
    ap.add_argument("--image-size", type=int, default=32, help="case 'real' without --features (default 32)")
    ap.add_argument("--device", default="cpu", help="probe device: cpu, cuda or auto")
    ap.add_argument("--repeats", type=int, default=1, help="probe repeats (median)")
    ap.add_argument("--ref-repeats", type=int, default=1, help="reference repeats (median); 0 skips it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--grad-bench", action="store_true", help="time one bf16 loss+gradient instead")
    ap.add_argument("--grad-n", type=int, help="rows for --grad-bench (default 1,280,000 on CUDA, 20,000 on CPU)")
    ap.add_argument("--grad-dtype", choices=("bfloat16", "float32"),
                    help="feature dtype for --grad-bench (default bfloat16 on CUDA; float32 on CPU, "
                    "where bf16 matmuls without hardware support are ~100x slower)")
    ap.add_argument("--verbose", action="store_true", help="log every fit on the path")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = resolve_device(args.device)
    results: dict[str, Any] = {"device": str(device), "torch": torch.__version__}

    if args.grad_bench:
        cuda = device.type == "cuda"
        n = args.grad_n or (1_280_000 if cuda else 20_000)
        dtype = getattr(torch, args.grad_dtype or ("bfloat16" if cuda else "float32"))
        r = grad_bench(device, n, 2048, 1000, dtype, repeats=10 if cuda else 3)
        results["grad_bench"] = r
        print(f"loss+grad {r['dtype']} {r['n']} x {r['d']} x {r['k']} on {device}: {r['ms']:.1f} ms "
              f"({r['tflops']:.2f} TFLOP/s; anchor 32 ms on H200, floor ~13 ms)")
    else:
        rows = []
        for case in args.cases.split(","):
            data = load_case(case, args)
            n, d = data["X_train"].shape
            print(f"# {case}: {n} x {d}, {int(data['y_train'].max()) + 1} classes", file=sys.stderr, flush=True)
            p = measure(lambda: probe(data, str(device)), args.repeats)
            print(f"#   probe: {p['cpu_s']:.1f} CPU s, val {100 * p['val_acc']:.2f}", file=sys.stderr, flush=True)
            row_p = {"case": case, "method": "probe", **p}
            if args.ref_repeats > 0:
                ref = measure(lambda: reference(data), args.ref_repeats)
                print(f"#   sklearn: {ref['cpu_s']:.1f} CPU s, val {100 * ref['val_acc']:.2f}", file=sys.stderr, flush=True)
                rows.append({"case": case, "method": "sklearn", **ref})
                row_p["ratio"] = ref["cpu_s"] / p["cpu_s"]
                row_p["val_gap_points"] = 100 * (p["val_acc"] - ref["val_acc"])
            rows.append(row_p)
        print_table(rows)
        results["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
