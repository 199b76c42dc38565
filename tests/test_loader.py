"""The worker loader: results do not depend on workers, augmentation is seeded, bad images are named or skipped."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

import lpft.data.loader as loader
from lpft.backbones import create_backbone
from lpft.data.files import load_task_yaml
from lpft.data.loader import SplitData, loading
from lpft.errors import TaskError
from lpft.features import cached_features
from lpft.training import Classifier, FinetuneConfig, finetune

from conftest import write_png_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def png_task(tmp_path_factory):
    return load_task_yaml(write_png_task(tmp_path_factory.mktemp("png")))


def _backbone(augment: str = "none"):
    torch.manual_seed(0)
    return create_backbone("timm:test_resnet", weights="random", image_size=32, augment=augment)


def _finetune(task, backbone, workers: int, stream: bool, monkeypatch, seed: int = 0) -> tuple[list, dict]:
    monkeypatch.setattr(loader, "PRELOAD_LIMIT_BYTES", 0 if stream else 1 << 30)
    torch.manual_seed(0)
    model = Classifier(copy.deepcopy(backbone), task.num_classes)
    with loading(workers=workers):
        train = SplitData(model.backbone, task.train, train=True, seed=seed)
        evals = {k: SplitData(model.backbone, s) for k, s in task.eval_splits()}
        assert train.preloaded is (not stream and backbone.augment == "none")
        result = finetune(model, train, evals, FinetuneConfig(epochs=2, lr=0.05, batch_size=16, seed=seed), CPU,
                          progress=False)
    return result.history, result.logits


def test_workers_do_not_change_results(png_task, monkeypatch):
    backbone = _backbone()
    in_memory = _finetune(png_task, backbone, 0, stream=False, monkeypatch=monkeypatch)
    for workers in (0, 2):
        history, logits = _finetune(png_task, backbone, workers, stream=True, monkeypatch=monkeypatch)
        assert history == in_memory[0]
        for key, value in in_memory[1].items():
            np.testing.assert_array_equal(logits[key], value)


def _first_batches(task, backbone, workers: int, seed: int, epoch: int = 1) -> torch.Tensor:
    with loading(workers=workers):
        data = SplitData(backbone, task.train, train=True, seed=seed)
        return torch.cat([b for _, b in data.batches([np.arange(0, 8), np.arange(8, 16)], epoch)])


def test_augmentation_is_seeded_per_example_whatever_the_workers(png_task):
    backbone = _backbone("paper")
    first = _first_batches(png_task, backbone, 0, seed=3)
    assert torch.equal(first, _first_batches(png_task, backbone, 2, seed=3))
    assert not torch.equal(first, _first_batches(png_task, backbone, 0, seed=4))
    assert not torch.equal(first, _first_batches(png_task, backbone, 0, seed=3, epoch=2))
    evaluation = SplitData(backbone, png_task.train).batch(np.arange(16))
    assert evaluation.shape == first.shape and not torch.equal(first, evaluation)


def test_augmented_run_is_reproducible(png_task, monkeypatch):
    backbone = _backbone("paper")  # the training split streams; evaluation splits are held in memory
    once = _finetune(png_task, backbone, 0, stream=False, monkeypatch=monkeypatch)
    again = _finetune(png_task, backbone, 2, stream=False, monkeypatch=monkeypatch)
    assert once[0] == again[0]
    assert once[0] != _finetune(png_task, backbone, 0, stream=False, monkeypatch=monkeypatch, seed=1)[0]


def test_paper_preset_evaluates_the_centre_crop(tmp_path):
    from timm.data import create_transform

    backbone = _backbone("paper")
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    expected = create_transform(input_size=32, interpolation=backbone.interpolation, crop_pct=backbone.crop_pct,
                                mean=backbone._mean.flatten().tolist(), std=backbone._std.flatten().tolist())
    torch.testing.assert_close(backbone.preprocess([tmp_path / "a.png"])[0], expected(Image.fromarray(image)))
    assert "augment=paper" in backbone.fingerprint and "augment" not in _backbone().fingerprint


def test_augment_is_refused_for_text_backbones():
    from lpft.errors import BackboneError

    with pytest.raises(BackboneError, match="augment.*image backbones"):
        create_backbone("minilm-l6", augment="paper")


def _break(task, row: int = 5):
    path = task.train.inputs[row]
    path.write_bytes(path.read_bytes()[:40])  # a truncated PNG
    return path


def test_a_bad_training_image_stops_the_run_naming_file_and_line(tmp_path, monkeypatch):
    task = load_task_yaml(write_png_task(tmp_path))
    bad = _break(task)
    with pytest.raises(TaskError, match=rf"train.csv, line 7: {bad}.*--skip-bad-images"):
        _finetune(task, _backbone(), 2, stream=True, monkeypatch=monkeypatch)


def test_skip_bad_images_leaves_them_out_of_training_and_counts_them(tmp_path, monkeypatch):
    task = load_task_yaml(write_png_task(tmp_path))
    bad = _break(task)
    monkeypatch.setattr(loader, "PRELOAD_LIMIT_BYTES", 1 << 30)
    backbone = _backbone()
    with loading(workers=2, skip_bad_images=True) as settings:
        train = SplitData(backbone, task.train, train=True)
        assert not train.preloaded  # rows would no longer line up: it streams
        rows = torch.cat([r for r, _ in train.batches([np.arange(len(task.train))])])
        assert 5 not in rows.tolist() and len(rows) == len(task.train) - 1
        assert settings.skipped == {"train": [f"{task.train.source}, line 7: {bad}"]}


def test_bad_evaluation_images_are_never_skipped(tmp_path):
    task = load_task_yaml(write_png_task(tmp_path))
    bad = task.id_val.inputs[0]
    bad.write_bytes(b"not an image")
    with loading(workers=0, skip_bad_images=True), pytest.raises(TaskError, match=rf"{bad}.*only training images"):
        SplitData(_backbone(), task.id_val)


def test_cached_features_are_memory_mapped_and_equal_to_extraction(png_task, cache):
    backbone = _backbone()
    with loading(workers=2):
        feats = cached_features(backbone, png_task.id_val)
        again = cached_features(backbone, png_task.id_val)
    assert isinstance(again, np.memmap) and str(again.filename).startswith(str(cache))
    fresh = cached_features(backbone, png_task.id_val, cache=False)
    np.testing.assert_array_equal(feats, fresh)
    np.testing.assert_array_equal(again, fresh)


def test_an_imagefolder_task_fine_tunes_with_paper_augmentation_from_the_cli(tmp_path):
    """The README's folder example, small: class folders, --augment paper, decoding workers, a record that says so."""
    import json
    import subprocess
    import sys

    import yaml

    task = load_task_yaml(write_png_task(tmp_path / "csv"))
    for key, folder in (("train", "train"), ("id_val", "val"), ("id_test", "test")):
        split = task.split(key)
        for path, label in zip(split.inputs, split.labels):
            target = tmp_path / "photos" / folder / task.classes[label] / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    spec = {"name": "photos", "modality": "image",
            "splits": {"train": "photos/train/", "id_val": "photos/val/", "id_test": "photos/test/"}}
    (tmp_path / "photos.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [sys.executable, "-m", "lpft.cli", "--no-progress", "run", str(tmp_path / "photos.yaml"),
         "--backbone", "timm:test_resnet", "--weights", "random", "--image-size", "32", "--method", "ft",
         "--epochs", "1", "--augment", "paper", "--workers", "2", "--json", str(tmp_path / "run.json")],
        capture_output=True, text=True, env={**__import__("os").environ, "LPFT_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["spec"]["backbone_options"]["augment"] == "paper"
    assert set(record["metrics"]) == {"id_val", "id_test"} and len(record["history"]) == 2


def test_a_feature_cache_hit_decodes_nothing(tmp_path, cache):
    task = load_task_yaml(write_png_task(tmp_path))
    backbone = _backbone()
    with loading(workers=0):
        feats = np.array(cached_features(backbone, task.id_val))
        for path in task.id_val.inputs:  # garbage of the same size and mtime: the same cache key
            stat = path.stat()
            path.write_bytes(b"x" * stat.st_size)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        # were the images decoded again, the garbage would stop this
        np.testing.assert_array_equal(cached_features(backbone, task.id_val), feats)
