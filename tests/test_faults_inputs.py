"""Hostile inputs: task files, CSVs, images and cache files are read exactly or refused, naming the culprit."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpft.backbones.base import Backbone
from lpft.data.images import load_rgb
from lpft.data import Split, TaskError
from lpft.data.files import load_task_yaml
from lpft.features import cached_features, feature_cache_key

TESTS = Path(__file__).resolve().parent
SPEC = "name: t\nmodality: {modality}\nsplits:\n  train: train.csv\n  id_val: val.csv\n  id_test: test.csv\n"


def _text_task(folder: Path, train: str | bytes | None = None, extra_yaml: str = "") -> Path:
    """A text task in ``folder`` whose train CSV is ``train`` (default: four good rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    if train is None:
        train = "text,label\nsunny day,weather\nfinal score,sports\nrain again,weather\ngoal!,sports\n"
    (folder / "train.csv").write_bytes(train.encode() if isinstance(train, str) else train)
    (folder / "val.csv").write_text("text,label\nwindy,weather\nmatch,sports\n")
    (folder / "test.csv").write_text("text,label\nsnow,weather\nteam,sports\n")
    spec = folder / "task.yaml"
    spec.write_text(SPEC.format(modality="text") + extra_yaml)
    return spec


def _image_task(folder: Path, paths: list[str], extra_yaml: str = "") -> Path:
    """An image task in ``folder``: two good images, then train rows for ``paths`` (labelled 'b')."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for name, shade in (("a.png", 0), ("b.png", 200)):
        Image.new("RGB", (6, 6), (shade, shade, shade)).save(folder / "img" / name)
    rows = "".join(f"{p},b\n" for p in paths)
    (folder / "train.csv").write_text(f"path,label\nimg/a.png,a\nimg/b.png,b\n{rows}")
    for split in ("val", "test"):
        (folder / f"{split}.csv").write_text("path,label\nimg/a.png,a\nimg/b.png,b\n")
    spec = folder / "task.yaml"
    spec.write_text(SPEC.format(modality="image") + extra_yaml)
    return spec


# --- CSV columns, encodings and line numbers ----------------------------------------------


def test_duplicated_column_is_refused_naming_file_and_column(tmp_path):
    spec = _text_task(tmp_path, "text,text,label\nfirst,second,weather\nthird,fourth,sports\n")
    with pytest.raises(TaskError, match=r"train.csv, line 1: column 'text' appears more than once"):
        load_task_yaml(spec)


def test_latin1_csv_is_refused_with_file_line_and_fix(tmp_path):
    spec = _text_task(tmp_path, "text,label\nsunny day,weather\ncaf\u00e9 ol\u00e9,sports\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"train.csv, line 3: byte 0xe9 is not UTF-8.*re-save the file as UTF-8"):
        load_task_yaml(spec)


def test_utf8_csv_with_byte_order_mark_is_read(tmp_path):
    spec = _text_task(tmp_path, "\ufefftext,label\ncaf\u00e9,weather\nscore,sports\n".encode("utf-8"))
    task = load_task_yaml(spec)
    assert task.train.inputs == ["caf\u00e9", "score"]
    assert task.classes == ("sports", "weather")


@pytest.mark.parametrize(
    "train, message",
    [
        ("text,label\na,weather\nb,sports\nc,bird\n", r"line 4: unknown label 'bird'"),
        ("text,label\na,weather\nb,sports\nc,\n", r"train.csv, line 4: 'label' is empty"),
        ("text,label\na,weather\nb,sports\n,sports\n", r"train.csv, line 4: 'text' is empty"),
        ("text,label\na,weather\nb,sports\n   ,sports\n", r"train.csv, line 4: 'text' is only whitespace"),
        ("text,label\na,weather\nb,sports\nhello, world,sports\n", r"train.csv, line 4: 3 fields but the header has 2"),
        ("text,label\na,weather\nb,sports\n\"unclosed,sports\n", r"train.csv, line 4: not valid CSV"),
        # a blank line and a quoted field spanning two lines still count, as in an editor
        ("text,label\n\"two\nlines\",weather\n\nc,bird\n", r"line 5: unknown label 'bird'"),
    ],
    ids=["unknown-label", "empty-label", "empty-text", "blank-text", "extra-field", "bad-quote", "multiline"],
)
def test_every_csv_error_names_the_line_an_editor_shows(tmp_path, train, message):
    spec = _text_task(tmp_path, train, extra_yaml="classes: [sports, weather]\n")
    with pytest.raises(TaskError, match=message):
        load_task_yaml(spec)


def test_class_missing_from_train_names_its_line(tmp_path):
    spec = _text_task(tmp_path, extra_yaml="classes: [sports, weather, food]\n")
    (tmp_path / "val.csv").write_text("text,label\nwindy,weather\nsoup,food\n")
    with pytest.raises(TaskError, match=r"val.csv, line 3: class 'food' never occurs in train"):
        load_task_yaml(spec)


# --- the task YAML -------------------------------------------------------------------------


def test_unknown_yaml_key_is_refused_listing_the_known_keys(tmp_path):
    spec = _text_task(tmp_path, extra_yaml="shuffle: true\n")
    with pytest.raises(TaskError, match=r"unknown keys \['shuffle'\]; the known keys are \['name', 'modality'"):
        load_task_yaml(spec)


def test_yaml_key_given_twice_is_refused(tmp_path):
    spec = _text_task(tmp_path, extra_yaml="modality: image\n")
    with pytest.raises(TaskError, match=r"task.yaml, line 7, column 1: not valid YAML: key 'modality' is given twice"):
        load_task_yaml(spec)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("  id_val: null\n", r"`splits.id_val` must be a CSV file name \(a string\), got null"),
        ("  id_val: 3\n", r"`splits.id_val` must be a CSV file name \(a string\), got 3 \(int\)"),
        ("  ood:\n    shifted: [a.csv]\n", r"`splits.ood.shifted` must be a CSV file name .*got \['a.csv'\]"),
        ("classes: sports, weather\n", r"`classes` must be a list of class names.*got 'sports, weather' \(str\)"),
        ("classes: [yes, no]\n", r"`classes` must hold names.*True is a bool"),
        ("allow_outside: sometimes\n", r"`allow_outside` must be true or false, got 'sometimes'"),
    ],
    ids=["null-split", "number-split", "list-ood-split", "string-classes", "boolean-classes", "allow-outside"],
)
def test_wrongly_typed_key_is_named_with_the_expected_type(tmp_path, yaml_text, message):
    spec = _text_task(tmp_path)
    text = spec.read_text()
    if yaml_text.startswith("  id_val"):  # replace the split rather than give it twice
        text = text.replace("  id_val: val.csv\n", yaml_text)
    else:
        text += yaml_text
    spec.write_text(text)
    with pytest.raises(TaskError, match=message):
        load_task_yaml(spec)


# --- paths outside the task folder ---------------------------------------------------------


def test_csv_outside_the_task_folder_is_refused_without_reading_it(tmp_path):
    (tmp_path / "elsewhere.csv").write_text("secret-column,label\nsecret-value,x\n")
    spec = _text_task(tmp_path / "task")
    for value in ("../elsewhere.csv", str(tmp_path / "elsewhere.csv")):
        spec.write_text(SPEC.format(modality="text").replace("train: train.csv", f"train: {value}"))
        with pytest.raises(TaskError, match=r"`splits.train` = .* outside the task folder .*allow_outside") as err:
            load_task_yaml(spec)
        assert "secret" not in str(err.value)


def test_symlinked_csv_is_judged_by_its_target(tmp_path):
    (tmp_path / "elsewhere.csv").write_text("text,label\nx,weather\ny,sports\n")
    spec = _text_task(tmp_path / "task")
    (tmp_path / "task" / "data").mkdir()
    (tmp_path / "task" / "data" / "val.csv").write_text("text,label\nwindy,weather\nmatch,sports\n")
    (tmp_path / "task" / "val.csv").unlink()
    (tmp_path / "task" / "val.csv").symlink_to(tmp_path / "task" / "data" / "val.csv")  # inside: fine
    assert len(load_task_yaml(spec).id_val) == 2
    (tmp_path / "task" / "train.csv").unlink()
    (tmp_path / "task" / "train.csv").symlink_to(tmp_path / "elsewhere.csv")
    with pytest.raises(TaskError, match=r"`splits.train` = 'train.csv' resolves to .*elsewhere.csv, outside"):
        load_task_yaml(spec)


def test_errors_never_quote_a_file_that_is_not_a_csv(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    spec = _text_task(tmp_path / "task", extra_yaml="allow_outside: true\n")
    spec.write_text(spec.read_text().replace("train: train.csv", f"train: {tmp_path / 'passwd'}"))
    with pytest.raises(TaskError, match=r"passwd, which is not a .csv file") as err:
        load_task_yaml(spec)
    assert "root:x" not in str(err.value)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_image_outside_the_task_folder_is_refused_unless_allowed(tmp_path, kind):
    outside = tmp_path / "private.png"
    Image.new("RGB", (6, 6), (9, 9, 9)).save(outside)
    folder = tmp_path / "task"
    value = {"dotdot": "../private.png", "absolute": str(outside), "symlink": "img/link.png"}[kind]
    spec = _image_task(folder, [value])
    if kind == "symlink":
        (folder / "img" / "link.png").symlink_to(outside)
    with pytest.raises(TaskError, match=r"train.csv, line 4: image .* resolves to .*private.png, outside the task"):
        load_task_yaml(spec)
    spec.write_text(spec.read_text() + "allow_outside: true\n")
    assert len(load_task_yaml(spec).train) == 3


# --- image decoding ------------------------------------------------------------------------


def test_16_bit_gradient_keeps_its_levels(tmp_path):
    values = np.linspace(0, 65535, 576).round().astype(np.uint16).reshape(24, 24)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    rgb = load_rgb(tmp_path / "g.png")
    assert rgb.shape == (24, 24, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values / 65535 * 255).astype(np.uint8))
    assert len(np.unique(rgb)) == 256


@pytest.mark.parametrize(
    "mode, values, full_scale",
    [("I", np.arange(0, 65536, 257, dtype=np.int32), 65535), ("F", np.linspace(0, 1, 256, dtype=np.float32), 1.0)],
)
def test_modes_without_a_bit_depth_are_scaled_to_their_range(tmp_path, mode, values, full_scale):
    img = Image.fromarray(values.reshape(16, 16))
    assert img.mode == mode
    img.save(tmp_path / "x.tif")
    grey = load_rgb(tmp_path / "x.tif")[..., 0]
    np.testing.assert_array_equal(grey.ravel(), np.rint(values / full_scale * 255).astype(np.uint8))


def test_out_of_range_float_image_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "signed.tif")
    with pytest.raises(TaskError, match=r"signed.tif: mode F values span -1..1, outside 0..65535"):
        load_rgb(tmp_path / "signed.tif")


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    """PIL opens a 16-bit RGB PNG as 8-bit RGB itself (guarding that it keeps doing so)."""
    import struct
    import zlib

    samples = np.array([[[0, 257 * 128, 65535], [300, 65000, 4000]]], dtype=">u2")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)  # 2x1, 16-bit, colour type 2 (RGB)
    pixels = zlib.compress(b"\x00" + samples.tobytes())
    (tmp_path / "rgb16.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgb16.png"), samples.astype(np.uint32) >> 8)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))  # transparent black
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    rgba.save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgba.png")[0], [[255, 255, 255], [255, 127, 127]])

    Image.new("LA", (1, 1), (0, 0)).save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "la.png")[0, 0], [255, 255, 255])

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)  # palette entry 0 (black) is transparent
    np.testing.assert_array_equal(load_rgb(tmp_path / "p.png")[0], [[255, 255, 255], [0, 0, 255]])


# --- the feature cache ---------------------------------------------------------------------


class CountingBackbone(Backbone):
    """A tiny text backbone, a fixed function of each text, that counts how often it runs."""

    name = "counting"
    modality = "text"
    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    @property
    def fingerprint(self) -> str:
        return "counting-v1"

    def preprocess(self, inputs) -> torch.Tensor:
        return torch.tensor([[len(t), sum(map(ord, t)) % 97] for t in inputs], dtype=torch.float32)

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        return torch.cat([batch, 2 * batch], dim=1)


def text_split() -> Split:
    return Split("train", ["alpha", "beta", "gamma", "delta", "epsilon"], np.array([0, 1, 0, 1, 0]), "memory")


def _entry(cache: Path) -> Path:
    return cache / "features" / (key := feature_cache_key(CountingBackbone(), text_split()))[:2] / f"{key}.npy"


def _truncate(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[:150])


def _garbage(entry: Path) -> None:
    entry.write_bytes(os.urandom(entry.stat().st_size))


def _other_values(entry: Path) -> None:
    np.save(entry, np.load(entry) + 1)


def _sidecar_shape(entry: Path) -> None:
    meta = json.loads(entry.with_suffix(".json").read_text())
    entry.with_suffix(".json").write_text(json.dumps({**meta, "shape": [4, 4]}))


def _sidecar_missing(entry: Path) -> None:
    entry.with_suffix(".json").unlink()


@pytest.mark.parametrize("damage", [_truncate, _garbage, _other_values, _sidecar_shape, _sidecar_missing])
def test_damaged_feature_cache_entry_is_logged_and_rebuilt(cache, caplog, damage):
    backbone, split = CountingBackbone(), text_split()
    expected = np.array(cached_features(backbone, split))  # a copy: the entry is memory-mapped, and damaged in place
    entry = _entry(cache)
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="lpft.features"):
        np.testing.assert_array_equal(cached_features(backbone, split), expected)
    assert any(str(entry) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), caplog.text
    runs = backbone.runs
    caplog.clear()
    np.testing.assert_array_equal(cached_features(backbone, split), expected)  # rebuilt: a clean hit
    assert backbone.runs == runs and not caplog.records


def test_truncated_prepared_benchmark_is_reported_missing_and_prepared_again(cache, caplog):
    from lpft.data.bundled.cache import load_npz, save_npz_atomic

    path = cache / "benchmarks" / "x" / "prepared.npz"
    path.parent.mkdir(parents=True)
    save_npz_atomic(path, images=np.arange(4000, dtype=np.uint8), labels=np.arange(10))
    path.write_bytes(path.read_bytes()[:2000])
    with caplog.at_level(logging.WARNING):
        assert load_npz(path) is None
    assert str(path) in caplog.text
    save_npz_atomic(path, labels=np.arange(3))
    np.testing.assert_array_equal(load_npz(path)["labels"], np.arange(3))


# --- temporary files of interrupted writes -------------------------------------------------

# Run in a child process: start writing a cache file (features: fill the memory-mapped temporary
# file; a prepared benchmark: write half of it), then die (SIGKILL) or hang.
INTERRUPTED_WRITER = """
import io, os, signal, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])

def stop():
    if sys.argv[3] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    time.sleep(120)

def half_then(real):
    def write(file, *args, **kwargs):
        buf = io.BytesIO()
        real(buf, *args, **kwargs)
        f = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        stop()
    return write

if sys.argv[2] == "features":
    from test_faults_inputs import CountingBackbone, text_split
    import lpft.features as features
    extract = features.compute_features
    def extract_then_stop(*args, **kwargs):
        extract(*args, **kwargs)
        stop()
    features.compute_features = extract_then_stop
    features.cached_features(CountingBackbone(), text_split())
else:
    from lpft.data.bundled.cache import save_npz_atomic
    np.savez = half_then(np.savez)
    save_npz_atomic(__import__("pathlib").Path(sys.argv[2]), labels=np.arange(1000))
"""


def _writer(target: str, then: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_WRITER, str(TESTS), target, then], stdout=subprocess.PIPE, text=True
    )


def _leftovers(folder: Path, *keep: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p not in keep)


def test_killed_writers_temporary_file_is_removed(cache):
    writer = _writer("features", "die")
    assert writer.wait(timeout=120) == -9
    entry = _entry(cache)
    assert _leftovers(cache / "features"), "the killed writer left no temporary file"
    backbone, split = CountingBackbone(), text_split()
    np.testing.assert_array_equal(cached_features(backbone, split), cached_features(backbone, split, cache=False))
    assert _leftovers(cache / "features", entry, entry.with_suffix(".json")) == []


def test_live_writers_temporary_file_is_kept_until_stale(cache):
    writer = _writer("features", "hang")
    try:
        assert writer.stdout.readline() == "writing\n"
        entry = _entry(cache)
        (temp,) = _leftovers(cache / "features")
        cached_features(CountingBackbone(), text_split())  # builds the entry itself, leaves the writer's file
        assert _leftovers(cache / "features", entry, entry.with_suffix(".json")) == [temp]
        an_hour_ago = time.time() - 3600
        os.utime(temp, (an_hour_ago, an_hour_ago))  # a hung writer: untouched for an hour
        cached_features(CountingBackbone(), text_split())
        assert not temp.exists()
    finally:
        writer.kill()
        writer.wait()


def test_killed_benchmark_writers_temporary_file_is_removed(cache):
    path = cache / "benchmarks" / "x" / "prepared.npz"
    path.parent.mkdir(parents=True)
    assert _writer(str(path), "die").wait(timeout=120) == -9
    assert _leftovers(path.parent), "the killed writer left no temporary file"
    from lpft.data.bundled.cache import load_npz

    assert load_npz(path) is None
    assert _leftovers(path.parent) == []
