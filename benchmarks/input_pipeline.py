"""The input pipeline at scale: decoding and augmenting JPEG folders, loading big folders, streaming features.

Parts (``--parts``, default all that the machine can run):

- ``decode``: decode + transform images/s through lpft's loader with 1, 2, ... workers, for the
  ``none`` preset (resize whole) and the ``paper`` preset (RandomResizedCrop + flip), on
  generated photo-like 500x375 JPEGs (smooth colour fields, shapes and grain; about 100 KB).
- ``train``: fine-tuning EfficientNet-Lite0 at 224 px from the JPEG files (streamed by the
  workers) against the same images decoded and held in memory. Median seconds per training
  step, in interleaved rounds; the ratio is the cost of reading files.
- ``folder``: load time of an ImageFolder task of 100,000 tiny files (no decoding), and
  ``lpft data check`` throughput with 1 and 2 workers.
- ``features``: extraction of 200,000 x 1,280 features into the memory-mapped cache (a small
  random network: the point is memory, not the model), in a fresh process: its peak RSS
  against the cache file's size.
- ``gpu`` (CUDA only): ResNet-50 and ViT-B/16 fast-path fine-tuning from the JPEG folder, decoded
  by the workers (PIL) and on the GPU (``decode="device"``: nvjpeg), against the same models on
  synthetic GPU-resident batches; and the linear probe's whole C path on
  ImageNet-size features (1.28M x 2,048, 1,000 classes) memory-mapped from the cache.

Run from the source tree::

    python benchmarks/input_pipeline.py --json input_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from lpft.backbones import create_backbone  # noqa: E402
from lpft.data import Task  # noqa: E402
from lpft.data.images import load_rgb  # noqa: E402
from lpft.data.loader import SplitData, available_cores, loading  # noqa: E402
import lpft.data.loader as loader  # noqa: E402

log = logging.getLogger("input_pipeline")


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like image: a smooth colour field, a few soft shapes, and sensor grain (JPEG ~100 KB at q90)."""
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(rng.integers(3, 7)):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = rng.integers(20, 120)
        draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 14, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_jpeg_folder(root: Path, n: int, classes: int = 4, seed: int = 0) -> list[tuple[Path, int]]:
    """``n`` JPEGs in ImageFolder layout (``class_k/img_i.jpg``); made once per folder."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % classes
        path = root / f"class_{label}" / f"img_{i:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(rng).save(path, quality=92)
        rows.append((path, label))
    return rows


def _task(rows: list[tuple[Path, int]], in_memory: bool) -> Task:
    """A task whose every split is ``rows`` (speed only), as files or as decoded arrays."""
    inputs = np.stack([load_rgb(p) for p, _ in rows]) if in_memory else [p for p, _ in rows]
    labels = [label for _, label in rows]
    split = (inputs, labels)
    return Task.from_arrays("jpegs", "image", {"train": split, "id_val": split, "id_test": split})


def bench_decode(rows, workers_list: list[int], n: int) -> list[dict]:
    task = _task(rows[:n], in_memory=False)
    out = []
    for preset in ("none", "paper"):
        backbone = create_backbone("efficientnet-lite0", weights="random", augment=preset)
        for workers in workers_list:
            with loading(workers=workers):
                data = SplitData(backbone, task.train, train=True, preload=False)
                index = [np.arange(i, min(i + 32, n)) for i in range(0, n, 32)]
                sum(len(r) for r, _ in data.batches(index[:workers + 1]))  # start the workers: not timed
                start = time.perf_counter()
                count = sum(len(r) for r, _ in data.batches(index, epoch=1))
                seconds = time.perf_counter() - start
            rate = count / seconds
            out.append({"preset": preset, "workers": workers, "images_per_s": round(rate, 1),
                        "per_worker": round(rate / max(workers, 1), 1)})
            log.info("decode %-5s workers=%d: %.0f images/s (%.0f per worker)", preset, workers, rate,
                     rate / max(workers, 1))
    return out


def bench_train(rows, n: int, steps_warm: int, rounds: int, workers: int, batch: int) -> dict:
    """Median training-step seconds, EfficientNet-Lite0 at 224 px: images in memory vs JPEG files (streamed)."""
    import copy

    from lpft.training import Classifier, FinetuneConfig, finetune

    backbone = create_backbone("efficientnet-lite0")
    tasks = {"memory": _task(rows[:n], in_memory=True), "files": _task(rows[:n], in_memory=False)}
    config = FinetuneConfig(epochs=1, lr=1e-3, batch_size=batch, eval_all_splits_each_epoch=False)
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(rounds):
        for name, task in tasks.items():
            loader.PRELOAD_LIMIT_BYTES = (1 << 30) if name == "memory" else 0
            stamps: list[float] = []
            model = Classifier(copy.deepcopy(backbone), task.num_classes)
            with loading(workers=workers):
                train = SplitData(model.backbone, task.train, train=True)
                val = SplitData(model.backbone, Task.from_arrays(
                    "v", "image", {k: (np.zeros((2, 8, 8, 3), np.uint8), [0, 1]) for k in ("train", "id_val", "id_test")}
                ).id_val)
                finetune(model, train, {"id_val": val}, config, torch.device("cpu"),
                         before_step=lambda step, _: stamps.append(time.perf_counter()), progress=False)
            steps = np.diff(stamps)[steps_warm:]
            times[name].extend(steps.tolist())
            log.info("train from %-6s: median step %.3f s over %d steps", name, statistics.median(steps), len(steps))
    loader.PRELOAD_LIMIT_BYTES = 1 << 30
    memory, files = statistics.median(times["memory"]), statistics.median(times["files"])
    result = {"batch": batch, "workers": workers, "memory_step_s": round(memory, 3), "files_step_s": round(files, 3),
              "files_vs_memory": round(files / memory, 3),
              "memory_images_per_s": round(batch / memory, 1), "files_images_per_s": round(batch / files, 1)}
    log.info("files vs memory: %.1f%% slower", 100 * (files / memory - 1))
    return result


def bench_folder(root: Path, n: int, check_images: int) -> dict:
    """Load an ImageFolder task of ``n`` tiny files; ``lpft data check`` throughput on JPEGs."""
    import yaml

    from lpft.data.check import check_images as check
    from lpft.data.files import load_task_yaml

    tiny = root / "tiny"
    pixel = tiny / "pixel.png"
    if not (tiny / "train").exists():
        tiny.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(pixel)
        data = pixel.read_bytes()
        for i in range(n):
            path = tiny / "train" / f"class_{i % 10}" / f"{i:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for split in ("val", "test"):
            for c in range(10):
                (tiny / split / f"class_{c}").mkdir(parents=True, exist_ok=True)
                (tiny / split / f"class_{c}" / "a.png").write_bytes(data)
    spec = tiny / "task.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny-folder", "modality": "image",
                                    "splits": {"train": "train/", "id_val": "val/", "id_test": "test/"}}))
    start = time.perf_counter()
    task = load_task_yaml(spec)
    load_s = time.perf_counter() - start
    log.info("loaded %d-file ImageFolder task in %.2f s", len(task.train), load_s)
    out = {"files": len(task.train), "load_s": round(load_s, 2), "check": []}
    jpegs = _task(make_jpeg_folder(root / "jpegs", check_images), in_memory=False)
    for workers in (1, 2):
        start = time.perf_counter()
        bad = check(jpegs, workers=workers)
        rate = 3 * check_images / (time.perf_counter() - start)  # every split holds the same rows
        assert not bad
        out["check"].append({"workers": workers, "images_per_s": round(rate, 1), "per_worker": round(rate / workers, 1)})
        log.info("data check, %d workers: %.0f images/s", workers, rate)
    return out


EXTRACT = """
import resource, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from lpft.backbones.base import ImageBackbone
from lpft.data import Task
from lpft.features import cached_features

class Projection(ImageBackbone):
    name, feature_dim = "projection", 1280
    def __init__(self):
        super().__init__(8, (0.5,) * 3, (0.5,) * 3)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 1280))
    @property
    def fingerprint(self):
        return "projection-benchmark"
    def features(self, batch):
        return self.net(batch)

n = int(sys.argv[2])
images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
task = Task.from_arrays("rss", "image", {k: (images, np.arange(n) % 2) for k in ("train", "id_val", "id_test")})
status = open("/proc/self/status").read()
before = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])  # kB, now
start = time.perf_counter()
feats = cached_features(Projection(), task.train, batch_size=4096)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB, the process's peak
print(before * 1024, peak * 1024, feats.nbytes, seconds, n * 3 * 8 * 8 * 4)
"""


def bench_features(n: int) -> dict:
    """Peak RSS of extracting ``n`` x 1,280 features into the cache, in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LPFT_CACHE": cache, "TQDM_DISABLE": "1"}
        out = subprocess.run([sys.executable, "-c", EXTRACT, str(SRC), str(n)], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
    before, peak, file_bytes, seconds, inputs = int(out[0]), int(out[1]), int(out[2]), float(out[3]), int(out[4])
    result = {"rows": n, "dim": 1280, "file_mb": round(file_bytes / 2**20), "preprocessed_inputs_mb": round(inputs / 2**20),
              "rss_before_mb": round(before / 2**20), "peak_rss_mb": round(peak / 2**20),
              "growth_vs_file": round((peak - before) / file_bytes, 2), "seconds": round(seconds, 1)}
    log.info("features %d x 1280: file %d MB, peak RSS %d MB (%d MB before extraction): growth %.2fx the file",
             n, result["file_mb"], result["peak_rss_mb"], result["rss_before_mb"], result["growth_vs_file"])
    return result


def bench_gpu(rows, seconds: float) -> dict:
    """On CUDA: ResNet-50 / ViT-B/16 fast-path FT from JPEG files (paper augmentation), decoded by the workers
    and on the GPU, vs synthetic device batches."""
    import copy

    from lpft.training import Classifier, FinetuneConfig, finetune

    device = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(device), "models": []}
    task = _task(rows, in_memory=False)
    for model_name, batch in (("resnet50", 256), ("vit_base_patch16_224", 256)):
        backbone = create_backbone(f"timm:{model_name}", weights="random", augment="paper")
        config = FinetuneConfig(epochs=1, lr=1e-3, batch_size=batch, eval_all_splits_each_epoch=False)
        stamps: list[float] = []

        def stamp(step, _model):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        rates: dict[str, float] = {}
        for decode in ("workers", "device"):  # JPEGs decoded by PIL in the workers, or by nvjpeg on the GPU
            stamps.clear()
            model = Classifier(copy.deepcopy(backbone), task.num_classes)
            with loading(decode=decode, device=device):
                train = SplitData(model.backbone, task.train, train=True)
                small = SplitData(model.backbone, task.id_val, preload=True)
                finetune(model, train, {"id_val": small}, config, device, before_step=stamp, progress=False)
            steps = np.diff(stamps)[3:]  # compilation and worker start-up excluded
            rates[decode] = batch / statistics.median(steps)
        files_rate = rates["workers"]
        synthetic = _synthetic_rate(model_name, batch, device, seconds)
        out["models"].append({"model": model_name, "files_images_per_s": round(files_rate), "synthetic_images_per_s":
                              round(synthetic), "ratio": round(files_rate / synthetic, 3), "workers": available_cores(),
                              "files_device_decode_images_per_s": round(rates["device"]),
                              "device_vs_workers_decode": round(rates["device"] / files_rate, 3)})
        log.info("%s: %.0f img/s from files (%.0f decoding on the GPU), %.0f synthetic (%.0f%%)", model_name,
                 files_rate, rates["device"], synthetic, 100 * files_rate / synthetic)
    return out


def _synthetic_rate(model_name: str, batch: int, device: torch.device, seconds: float) -> float:
    """images/s of the same fast path on random GPU-resident batches (lpft's loop, data already on the device)."""
    from lpft.training import Classifier, FinetuneConfig, finetune

    n = batch * 12
    images = np.random.default_rng(0).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    task = Task.from_arrays("synthetic", "image", {k: (images, np.arange(n) % 4) for k in ("train", "id_val", "id_test")})
    backbone = create_backbone(f"timm:{model_name}", weights="random")
    stamps: list[float] = []

    def stamp(step, _model):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    config = FinetuneConfig(epochs=1, lr=1e-3, batch_size=batch, eval_all_splits_each_epoch=False)
    model = Classifier(backbone, task.num_classes)
    finetune(model, SplitData(backbone, task.train), {"id_val": SplitData(backbone, task.id_val)}, config, device,
             before_step=stamp, progress=False)
    return batch / statistics.median(np.diff(stamps)[3:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="decode,train,folder,features,gpu")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "lpft-input-pipeline",
                        help="where the generated images are kept between runs")
    parser.add_argument("--images", type=int, default=512, help="JPEGs for the decode part")
    parser.add_argument("--train-images", type=int, default=512, help="JPEGs for the CPU training part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder-files", type=int, default=100_000)
    parser.add_argument("--feature-rows", type=int, default=200_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    parts = set(args.parts.split(","))
    cores = available_cores()
    result: dict = {"cores": cores, "torch": torch.__version__, "threads": torch.get_num_threads()}
    rows = make_jpeg_folder(args.root / "jpegs", max(args.images, args.train_images))
    sizes = [p.stat().st_size for p, _ in rows]
    result["jpeg_kb_mean"] = round(statistics.mean(sizes) / 1024, 1)
    log.info("%d JPEGs of 500x375, %.0f KB on average, in %s", len(rows), result["jpeg_kb_mean"], args.root)
    if "decode" in parts:
        result["decode"] = bench_decode(rows, sorted({1, 2, cores}), args.images)
    if "train" in parts:
        result["train"] = [bench_train(rows, args.train_images, steps_warm=1, rounds=args.rounds, workers=w, batch=32)
                           for w in (1, 2)]
    if "folder" in parts:
        result["folder"] = bench_folder(args.root, args.folder_files, check_images=256)
    if "features" in parts:
        result["features"] = bench_features(args.feature_rows)
    if "gpu" in parts:
        if torch.cuda.is_available():
            gpu_rows = make_jpeg_folder(args.root / "jpegs", 256 * 16)
            result["gpu"] = bench_gpu(gpu_rows, seconds=20)
        else:
            result["gpu"] = "no CUDA device here: the GPU figures come from benchmarks/gpu_checks.sh on a GPU machine"
            log.info(result["gpu"])
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
