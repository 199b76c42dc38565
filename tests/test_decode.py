"""``decode="device"``: JPEGs read by the workers and decoded by the main process on the device.

On the CPU the device path must give the workers' tensors for ``none`` (torchvision's decoder
and PIL both use libjpeg-turbo), fall back to PIL per image, keep augmentation seeded per
example, and name a bad image as the workers path does.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import lpft.data.loader as loader
from lpft.backbones import create_backbone
from lpft.data import Task
from lpft.data.decode import device_decodable
from lpft.data.files import load_task_yaml
from lpft.data.loader import SplitData, loading
from lpft.errors import TaskError
from lpft.features import cached_features, feature_cache_key
from lpft.training import Classifier, FinetuneConfig, finetune

CPU = torch.device("cpu")
SIZES = [(40, 30), (30, 40), (36, 36), (45, 28)]  # width x height


def _photo(rng: np.random.Generator, label: int, size: tuple[int, int]) -> Image.Image:
    """A smooth colour field tinted by ``label``, with grain: something a JPEG encoder treats like a photo."""
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    tint = np.array([[255, 60, 60], [60, 255, 60], [60, 60, 255]][label], dtype=np.float32)
    pixels = 0.5 * np.asarray(field, dtype=np.float32) + 0.5 * tint + rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_jpeg_task(root: Path) -> Path:
    """A 3-class task of colour JPEGs (quality 90) of a few sizes; every fifth image a PNG, so batches mix both."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for name, n in (("train", 36), ("val", 12), ("test", 12)):
        lines = ["path,label"]
        for i in range(n):
            label = i % 3
            file = f"img/{name}-{i}.{'png' if i % 5 == 4 else 'jpg'}"
            _photo(rng, label, SIZES[i % len(SIZES)]).save(root / file, quality=90)
            lines.append(f"{file},{label}")
        (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    task = {"name": "tiny-jpegs", "modality": "image",
            "splits": {"train": "train.csv", "id_val": "val.csv", "id_test": "test.csv"}}
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    return root / "task.yaml"


@pytest.fixture(scope="module")
def jpeg_task(tmp_path_factory):
    return load_task_yaml(write_jpeg_task(tmp_path_factory.mktemp("jpegs")))


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """How many JPEGs the main process decoded on the device (proof that the device path ran)."""
    counts: list[int] = []
    real = loader.decode_jpegs

    def counting(jpegs, device):
        counts.append(len(jpegs))
        return real(jpegs, device)

    monkeypatch.setattr(loader, "decode_jpegs", counting)
    return counts


def _backbone(augment: str = "none"):
    torch.manual_seed(0)
    return create_backbone("timm:test_resnet", weights="random", image_size=32, augment=augment)


def _batches(split, backbone, decode: str, workers: int = 0, train: bool = False, seed: int = 0, epoch: int = 1,
             preload: bool | None = False) -> torch.Tensor:
    with loading(workers=workers, decode=decode):
        data = SplitData(backbone, split, train=train, seed=seed, preload=preload)
        if data.preloaded:
            return data.batch(np.arange(len(split)))
        index = [np.arange(i, min(i + 8, len(split))) for i in range(0, len(split), 8)]
        return torch.cat([batch for _, batch in data.batches(index, epoch)])


def _encoded(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, **save)
    return out.getvalue()


def test_only_complete_three_component_jpegs_go_to_the_device():
    rgb = _photo(np.random.default_rng(0), 0, (40, 30))
    jpeg = _encoded(rgb, format="JPEG", quality=90)
    assert device_decodable(jpeg)
    assert device_decodable(_encoded(rgb, format="JPEG", quality=90, progressive=True))
    assert not device_decodable(_encoded(rgb.convert("L"), format="JPEG"))  # greyscale
    assert not device_decodable(_encoded(rgb.convert("CMYK"), format="JPEG"))
    assert not device_decodable(jpeg[: len(jpeg) // 2])  # cut short: PIL names the problem
    assert not device_decodable(_encoded(rgb, format="PNG"))
    assert not device_decodable(b"")


def test_device_decoding_equals_the_workers_for_preset_none(jpeg_task, decoded):
    backbone = _backbone()
    expected = _batches(jpeg_task.train, backbone, "workers")
    for workers in (0, 2):
        decoded.clear()
        torch.testing.assert_close(_batches(jpeg_task.train, backbone, "device", workers), expected, rtol=0, atol=1e-6)
        assert sum(decoded) == sum(not str(p).endswith(".png") for p in jpeg_task.train.inputs)  # PNGs fell back
    decoded.clear()
    preloaded = _batches(jpeg_task.id_val, backbone, "device", preload=None)  # small: decoded once, then held
    torch.testing.assert_close(preloaded, _batches(jpeg_task.id_val, backbone, "workers", preload=None), rtol=0, atol=1e-6)
    assert sum(decoded) > 0 and preloaded.device == CPU


def test_images_the_device_does_not_take_are_decoded_by_the_workers_in_the_same_batch(tmp_path, decoded):
    rng = np.random.default_rng(1)
    photo = _photo(rng, 1, (40, 30))
    files = {"rgb.jpg": photo, "grey.jpg": photo.convert("L"), "cmyk.jpg": photo.convert("CMYK"), "png.png": photo}
    for name, image in files.items():
        image.save(tmp_path / name, quality=90)
    paths = [tmp_path / name for name in files]
    arrays = np.stack([np.asarray(_photo(rng, k % 3, (40, 30))) for k in range(4)])
    task = Task.from_arrays("mixed", "image", {k: (paths, [0, 1, 2, 0]) for k in ("train", "id_val", "id_test")},
                            ood={"arrays": (arrays, [0, 1, 2, 0])})
    backbone = _backbone()
    torch.testing.assert_close(_batches(task.train, backbone, "device", workers=2),
                               _batches(task.train, backbone, "workers"), rtol=0, atol=1e-6)
    assert decoded == [1]  # only the RGB JPEG
    torch.testing.assert_close(_batches(task.ood["arrays"], backbone, "device"),
                               _batches(task.ood["arrays"], backbone, "workers"), rtol=0, atol=1e-6)


def test_paper_training_batches_are_seeded_per_example_whatever_the_workers(jpeg_task, decoded):
    backbone = _backbone("paper")
    first = _batches(jpeg_task.train, backbone, "device", 0, train=True, seed=3)
    assert first.shape == (len(jpeg_task.train), 3, 32, 32) and sum(decoded) > 0
    assert torch.equal(first, _batches(jpeg_task.train, backbone, "device", 2, train=True, seed=3))
    assert not torch.equal(first, _batches(jpeg_task.train, backbone, "device", 0, train=True, seed=4))
    assert not torch.equal(first, _batches(jpeg_task.train, backbone, "device", 0, train=True, seed=3, epoch=2))
    evaluation = _batches(jpeg_task.train, backbone, "device", 0, train=False)
    assert evaluation.shape == first.shape and not torch.equal(first, evaluation)


def test_paper_evaluation_crops_as_timm_does_up_to_resampling(jpeg_task):
    backbone = _backbone("paper")
    device = _batches(jpeg_task.id_val, backbone, "device")
    workers = _batches(jpeg_task.id_val, backbone, "workers")
    in_pixels = (device - workers).abs() * backbone._std.view(1, 3, 1, 1)  # back to 0..1 pixel units
    assert in_pixels.max() < 2 / 255 and in_pixels.mean() < 0.5 / 255  # PIL rounds to uint8; the rest is resampling


def _break_scan(path: Path) -> None:
    """Keep the JPEG's headers and end marker, drop its scan: it passes the device check but decodes nowhere."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xd9")


def test_a_jpeg_the_device_cannot_decode_is_named_or_skipped_as_without_it(tmp_path, decoded):
    task = load_task_yaml(write_jpeg_task(tmp_path))
    bad = task.train.inputs[5]
    _break_scan(bad)
    assert device_decodable(bad.read_bytes())
    backbone = _backbone()
    with loading(workers=2, decode="device"), pytest.raises(TaskError, match=rf"train.csv, line 7: {bad}.*--skip-bad-images"):
        SplitData(backbone, task.train, train=True, preload=False).batch(np.arange(8))
    with loading(workers=2, decode="device", skip_bad_images=True) as settings:
        train = SplitData(backbone, task.train, train=True, preload=False)
        rows = torch.cat([r for r, _ in train.batches([np.arange(8), np.arange(8, len(task.train))])])
    assert 5 not in rows.tolist() and len(rows) == len(task.train) - 1
    assert settings.skipped == {"train": [f"{task.train.source}, line 7: {bad}"]}
    cut = task.id_val.inputs[0]
    cut.write_bytes(cut.read_bytes()[:60])  # cut short: the worker's PIL names it
    with loading(workers=0, decode="device"), pytest.raises(TaskError, match=rf"val.csv, line 2: {cut}"):
        SplitData(backbone, task.id_val)


def _finetune(task, backbone, decode: str, stream: bool, monkeypatch) -> tuple[list, dict]:
    monkeypatch.setattr(loader, "PRELOAD_LIMIT_BYTES", 0 if stream else 1 << 30)
    torch.manual_seed(0)
    model = Classifier(copy.deepcopy(backbone), task.num_classes)
    with loading(workers=2 if stream else 0, decode=decode):
        train = SplitData(model.backbone, task.train, train=True)
        evals = {k: SplitData(model.backbone, s) for k, s in task.eval_splits()}
        result = finetune(model, train, evals, FinetuneConfig(epochs=2, lr=0.05, batch_size=12), CPU, progress=False)
    return result.history, result.logits


def test_a_finetune_decoding_on_the_device_matches_the_workers(jpeg_task, monkeypatch, decoded):
    backbone = _backbone()
    for stream in (True, False):
        history, logits = _finetune(jpeg_task, backbone, "workers", stream, monkeypatch)
        decoded.clear()
        device_history, device_logits = _finetune(jpeg_task, backbone, "device", stream, monkeypatch)
        assert sum(decoded) > 0
        assert device_history == history
        for key, value in logits.items():
            np.testing.assert_array_equal(device_logits[key], value)


def test_device_decoded_features_are_cached_apart(jpeg_task, cache):
    backbone = _backbone()
    assert feature_cache_key(backbone, jpeg_task.id_val, "decode_jpeg:cpu") != feature_cache_key(backbone, jpeg_task.id_val)
    workers = cached_features(backbone, jpeg_task.id_val)
    with loading(workers=0, decode="device"):
        device = cached_features(backbone, jpeg_task.id_val)
    assert workers.filename != device.filename
    np.testing.assert_allclose(device, workers, rtol=0, atol=1e-5)


def test_decode_is_checked_and_offered_on_the_command_line():
    import argparse

    from lpft.commands.common import add_loader_arguments

    with pytest.raises(TaskError, match="decode.*'gpu'"), loading(decode="gpu"):
        pass
    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    assert parser.parse_args([]).decode == "auto"
    assert parser.parse_args(["--decode", "device"]).decode == "device"
