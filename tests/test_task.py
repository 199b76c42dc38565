"""The Task contract: construction from arrays and YAML, and every validation error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpft.data import Task, TaskError, load_task
from lpft.data.check import check_images
from lpft.data.files import load_task_yaml

from conftest import TEXT_TOPICS


def _text_splits():
    return {
        "train": (["a", "b", "c", "d"], ["x", "y", "x", "y"]),
        "id_val": (["e", "f"], ["x", "y"]),
        "id_test": (["g", "h"], ["y", "x"]),
    }


def test_from_arrays_class_names_from_string_labels():
    task = Task.from_arrays("t", "text", _text_splits(), ood={"s": (["i"], ["y"])})
    assert task.classes == ("x", "y")
    assert task.train.labels.tolist() == [0, 1, 0, 1]
    assert [k for k, _ in task.eval_splits()] == ["id_val", "id_test", "ood/s"]


def test_from_arrays_int_labels_sort_numerically_and_accept_tensors():
    labels = torch.tensor([10, 9, 2, 10])
    images = np.zeros((4, 8, 8), dtype=np.uint8)  # grayscale is expanded to RGB
    task = Task.from_arrays(
        "t", "image",
        {"train": (images, labels), "id_val": (images[:2], [10, 9]), "id_test": (images[:2], [2, 9])},
    )
    assert task.classes == ("2", "9", "10")
    assert task.train.inputs.shape == (4, 8, 8, 3)
    assert task.train.labels.tolist() == [2, 1, 0, 2]


def test_unknown_label_names_split_and_row():
    splits = _text_splits()
    splits["id_val"] = (["e", "f", "g"], ["x", "y", "z"])
    with pytest.raises(TaskError, match=r"'id_val'.*row 3: unknown label 'z'"):
        Task.from_arrays("t", "text", splits)


def test_ood_class_missing_from_train_is_rejected():
    splits = _text_splits()
    with pytest.raises(TaskError, match=r"'ood/s'.*\['z'\].*never occur in train"):
        Task.from_arrays("t", "text", splits, ood={"s": (["i", "j"], ["x", "z"])}, classes=["x", "y", "z"])


def test_empty_split_is_rejected():
    splits = _text_splits()
    splits["id_test"] = ([], [])
    with pytest.raises(TaskError, match="'id_test'.*empty"):
        Task.from_arrays("t", "text", splits)


def test_missing_split_is_rejected():
    splits = _text_splits()
    del splits["id_val"]
    with pytest.raises(TaskError, match=r"missing splits \['id_val'\]"):
        Task.from_arrays("t", "text", splits)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _image_task(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for i in range(6):
        Image.new("RGB", (10 + i, 12), (40 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    rows = [[f"img/{i}.png", "cat" if i % 2 else "dog"] for i in range(6)]
    _write_csv(tmp_path / "train.csv", ["path", "label"], rows[:4])
    _write_csv(tmp_path / "val.csv", ["path", "label"], rows[4:])
    _write_csv(tmp_path / "test.csv", ["path", "label"], rows[4:])
    _write_csv(tmp_path / "ood.csv", ["path", "label"], rows[:2])
    spec = tmp_path / "task.yaml"
    spec.write_text(
        "name: pets\nmodality: image\nsplits:\n  train: train.csv\n  id_val: val.csv\n  id_test: test.csv\n"
        "  ood:\n    sketch: ood.csv\n"
    )
    return spec


def test_yaml_image_task_loads_with_paths_relative_to_csv(tmp_path):
    task = load_task(_image_task(tmp_path))
    assert task.name == "pets" and task.classes == ("cat", "dog")
    assert task.ood["sketch"].inputs[0] == tmp_path / "img" / "0.png"
    assert len(task.train) == 4


def test_yaml_corrupt_image_loads_and_check_images_names_every_use(tmp_path):
    spec = _image_task(tmp_path)
    (tmp_path / "img" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    task = load_task_yaml(spec)  # loading never decodes
    bad = check_images(task, workers=1)
    assert [(b.split, b.where) for b in bad] == [
        ("train", f"{tmp_path / 'train.csv'}, line 3: {tmp_path / 'img' / '1.png'}"),
        ("ood/sketch", f"{tmp_path / 'ood.csv'}, line 3: {tmp_path / 'img' / '1.png'}"),
    ]


def test_yaml_missing_image_names_file_and_line(tmp_path):
    spec = _image_task(tmp_path)
    (tmp_path / "img" / "5.png").unlink()
    with pytest.raises(TaskError, match=r"val.csv, line 3: image .*5.png does not exist"):
        load_task_yaml(spec)


def test_yaml_missing_csv_file(tmp_path):
    spec = _image_task(tmp_path)
    (tmp_path / "ood.csv").unlink()
    with pytest.raises(TaskError, match=r"split file .*ood.csv does not exist"):
        load_task_yaml(spec)


def test_yaml_unknown_label_in_csv_names_line(tmp_path):
    spec = _image_task(tmp_path)
    _write_csv(tmp_path / "test.csv", ["path", "label"], [["img/4.png", "dog"], ["img/5.png", "bird"]])
    with pytest.raises(TaskError, match=r"test.csv\), line 3: unknown label 'bird'"):
        load_task_yaml(spec)


def test_yaml_wrong_columns(tmp_path):
    spec = _image_task(tmp_path)
    _write_csv(tmp_path / "val.csv", ["file", "label"], [["img/4.png", "dog"]])
    with pytest.raises(TaskError, match=r"val.csv, line 1: needs columns 'path' and 'label'"):
        load_task_yaml(spec)


def test_yaml_empty_csv(tmp_path):
    spec = _image_task(tmp_path)
    _write_csv(tmp_path / "val.csv", ["path", "label"], [])
    with pytest.raises(TaskError, match=r"val.csv: no rows"):
        load_task_yaml(spec)


def test_yaml_bad_modality(tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text("name: x\nmodality: audio\nsplits: {}\n")
    with pytest.raises(TaskError, match="modality"):
        load_task_yaml(spec)


def test_unknown_task_name():
    with pytest.raises(TaskError, match="unknown task 'no-such-benchmark'"):
        load_task("no-such-benchmark")


def test_a_benchmark_option_it_does_not_have_is_refused_naming_those_it_has():
    with pytest.raises(TaskError, match=r"no option sise; its options: size, id_style"):
        load_task("emoji-styles", sise=128)


def test_options_given_with_a_task_file_are_refused_not_ignored():
    with pytest.raises(TaskError, match="apply to bundled benchmarks, not to the task file"):
        load_task(TEXT_TOPICS, size=128)


def test_text_topics_example_loads():
    task = load_task(TEXT_TOPICS)
    assert task.modality == "text"
    assert set(task.classes) == {"food", "sports", "technology", "weather"}
    assert set(task.ood) == {"casual", "questions"}
