"""Split sources beyond CSV (ImageFolder, Parquet, saved Hugging Face datasets, WebDataset shards):
each gives the task its CSV twin gives, refuses bad input naming the file and row, and never
decodes an image at load; ``check_images`` and ``lpft data check`` decode and list every bad one."""

from __future__ import annotations

import io
import re
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from lpft.cli import main as cli_main
from lpft.data import Task, TaskError
from lpft.data.check import check_images
from lpft.data.files import load_task_yaml
from lpft.data.images import FileRange, InlineImage, load_rgb
from lpft.data.sources import expand_braces

datasets = pytest.importorskip("datasets")

SPLITS = ("train", "id_val", "id_test", "ood/sketch")
# (split, label) of each example; example i is an image of its own colour, or the text "text i"
EXAMPLES = [("train", "cat"), ("train", "dog"), ("train", "cat"), ("train", "dog"), ("train", "cat"),
            ("id_val", "dog"), ("id_val", "cat"), ("id_test", "cat"), ("id_test", "dog"),
            ("ood/sketch", "dog"), ("ood/sketch", "cat")]
TEXT_INPUT = "text {}, with a comma"


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5 + i % 3, 4), (20 * i, 255 - 20 * i, 7 * i)).save(buf, "PNG")
    return buf.getvalue()


def _examples(split: str) -> list[tuple[int, str]]:
    return [(i, label) for i, (s, label) in enumerate(EXAMPLES) if s == split]


def _file_name(split: str) -> str:
    return split.replace("ood/", "ood-")


def _write_yaml(folder: Path, modality: str, values: dict[str, str], extra: str = "") -> Path:
    spec = folder / "task.yaml"
    spec.write_text(
        f"name: t\nmodality: {modality}\n{extra}splits:\n  train: {values['train']}\n  id_val: {values['id_val']}\n"
        f"  id_test: {values['id_test']}\n  ood:\n    sketch: {values['ood/sketch']}\n"
    )
    return spec


def _csv_task(folder: Path, modality: str) -> Path:
    """The reference: the same examples as CSV files (images as PNG files beside them)."""
    (folder / "img").mkdir(parents=True)
    values = {}
    for split in SPLITS:
        lines = ["path,label" if modality == "image" else "text,label"]
        for i, label in _examples(split):
            if modality == "image":
                (folder / "img" / f"{i:02d}.png").write_bytes(_png(i))
                lines.append(f"img/{i:02d}.png,{label}")
            else:
                lines.append(f'"{TEXT_INPUT.format(i)}",{label}')
        (folder / f"{_file_name(split)}.csv").write_text("\n".join(lines) + "\n")
        values[split] = f"{_file_name(split)}.csv"
    return _write_yaml(folder, modality, values)


def _image_folder_task(folder: Path, modality: str = "image") -> Path:
    values = {}
    for split in SPLITS:
        for i, label in _examples(split):
            (folder / "images" / _file_name(split) / label).mkdir(parents=True, exist_ok=True)
            (folder / "images" / _file_name(split) / label / f"{i:02d}.png").write_bytes(_png(i))
        values[split] = f"images/{_file_name(split)}/"
    return _write_yaml(folder, modality, values)


def _parquet_task(folder: Path, modality: str) -> Path:
    """Train as two files (a glob), plain bytes with string labels; the rest as `datasets` writes Parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    values = {}
    for split in SPLITS:
        rows = _examples(split)
        if split == "train":
            for part, chunk in enumerate((rows[:2], rows[2:])):
                column = [_png(i) if modality == "image" else TEXT_INPUT.format(i) for i, _ in chunk]
                table = pa.table({"image" if modality == "image" else "text": column, "label": [b for _, b in chunk]})
                pq.write_table(table, folder / f"train-{part}.parquet")
            values[split] = "train-*.parquet"
        else:
            _hf_dataset(rows, modality).to_parquet(folder / f"{_file_name(split)}.parquet")
            values[split] = f"{_file_name(split)}.parquet"
    return _write_yaml(folder, modality, values)


def _hf_dataset(rows: list[tuple[int, str]], modality: str) -> datasets.Dataset:
    """Images as the Image feature, labels as a ClassLabel whose order is not the sorted one."""
    labels = datasets.ClassLabel(names=["dog", "cat"])
    if modality == "image":
        data = {"image": [{"bytes": _png(i), "path": None} for i, _ in rows]}
        features = {"image": datasets.Image()}
    else:
        data = {"text": [TEXT_INPUT.format(i) for i, _ in rows]}
        features = {"text": datasets.Value("string")}
    data["label"] = [labels.str2int(b) for _, b in rows]
    return datasets.Dataset.from_dict(data, features=datasets.Features({**features, "label": labels}))


def _hf_task(folder: Path, modality: str) -> Path:
    values = {}
    for split in SPLITS:
        _hf_dataset(_examples(split), modality).save_to_disk(folder / "hf" / _file_name(split),
                                                             num_shards=2 if split == "train" else 1)
        values[split] = f"hf/{_file_name(split)}"
    return _write_yaml(folder, modality, values)


def _write_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def _sample(i: int, label: str, modality: str) -> dict:
    content = {"png": _png(i)} if modality == "image" else {"txt": TEXT_INPUT.format(i)}
    return {"__key__": f"sample{i:04d}", **content, "cls": label}


def _shards_task(folder: Path, modality: str) -> Path:
    """Train as a brace range of two shards, id_val a folder of shards, the rest single shards."""
    values = {}
    for split in SPLITS:
        samples = [_sample(i, label, modality) for i, label in _examples(split)]
        if split == "train":
            _write_shard(folder / "shards" / "train-000000.tar", samples[:3])
            _write_shard(folder / "shards" / "train-000001.tar", samples[3:])
            values[split] = "shards/train-{000000..000001}.tar"
        elif split == "id_val":
            _write_shard(folder / "shards" / "val" / "val-000000.tar", samples)
            values[split] = "shards/val/"
        else:
            _write_shard(folder / "shards" / f"{_file_name(split)}.tar", samples)
            values[split] = f"shards/{_file_name(split)}.tar"
    return _write_yaml(folder, modality, values)


WRITERS = {"image-folder": _image_folder_task, "parquet": _parquet_task, "hf": _hf_task, "webdataset": _shards_task}


def _content(task: Task) -> dict[str, list]:
    """Per split, the sorted (class name, decoded pixels or text) pairs: what a model would see."""
    def value(x):
        return x if task.modality == "text" else load_rgb(x).tobytes()

    return {key: sorted((task.classes[y], value(x)) for x, y in zip(split.inputs, split.labels))
            for key, split in task.splits()}


@pytest.mark.parametrize("source, modality", [(s, m) for s in WRITERS for m in ("image", "text")
                                              if (s, m) != ("image-folder", "text")])  # an ImageFolder holds images
def test_each_source_gives_the_task_its_csv_twin_gives(tmp_path, source, modality):
    reference = load_task_yaml(_csv_task(tmp_path / "csv", modality))
    task = load_task_yaml(WRITERS[source](tmp_path / source, modality))
    assert task.classes == reference.classes == ("cat", "dog")
    assert {k: len(s) for k, s in task.splits()} == {k: len(s) for k, s in reference.splits()}
    assert _content(task) == _content(reference)
    assert all(split.lines is None for _, split in task.splits())
    assert task.train.source.startswith(str(tmp_path / source))


def test_image_rows_are_lazy_references_that_name_themselves(tmp_path):
    shards = load_task_yaml(_shards_task(tmp_path / "wds", "image"))
    first = shards.train.inputs[0]
    assert isinstance(first, FileRange) and str(first) == "train-000000.tar:sample0000.png"
    assert shards.train.locate(0) == "train-000000.tar:sample0000.png"

    hf = load_task_yaml(_hf_task(tmp_path / "hf", "image"))  # bytes stay in the memory-mapped .arrow file
    assert all(isinstance(x, FileRange) and x.file.endswith(".arrow") for x in hf.train.inputs)
    assert str(hf.id_val.inputs[1]) == "id_val, row 2"

    parquet = load_task_yaml(_parquet_task(tmp_path / "pq", "image"))
    assert isinstance(parquet.train.inputs[2], InlineImage) and str(parquet.train.inputs[2]) == "train-1.parquet, row 1"

    folder = load_task_yaml(_image_folder_task(tmp_path / "folder"))
    assert folder.train.inputs[0] == tmp_path / "folder" / "images" / "train" / "cat" / "00.png"


def test_an_image_struct_without_bytes_reads_its_path_relative_to_the_parquet_file(tmp_path):
    spec = _parquet_task(tmp_path, "image")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(3))
    image = pa.array([{"bytes": None, "path": "img/a.png"}, {"bytes": _png(4), "path": "ignored.png"}],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "label": ["cat", "dog"]}), tmp_path / "id_val.parquet")
    first, second = load_task_yaml(spec).id_val.inputs
    assert first == tmp_path / "img" / "a.png" and isinstance(second, InlineImage)
    assert load_rgb(first).tobytes() == load_rgb(io.BytesIO(_png(3))).tobytes()


def test_shard_index_matches_what_webdataset_itself_reads(tmp_path):
    task = load_task_yaml(_shards_task(tmp_path, "image"))
    urls = [str(tmp_path / "shards" / f"train-00000{i}.tar") for i in range(2)]
    read = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in read] == [str(x).split(":")[1].removesuffix(".png") for x in task.train.inputs]
    assert [s["png"] for s in read] == [x.open().read() for x in task.train.inputs]
    assert [s["cls"].decode() for s in read] == [task.classes[y] for y in task.train.labels]


def test_integer_labels_and_class_label_names(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [10, 9, 2]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["d"], "label": [9]}), tmp_path / "val.parquet")
    spec = _write_yaml(tmp_path, "text", dict.fromkeys(SPLITS, "val.parquet") | {"train": "train.parquet"})
    assert load_task_yaml(spec).classes == ("2", "9", "10")  # numerically, as CSV labels are

    categorical = pa.array(["dog", "cat", "dog"]).dictionary_encode()  # what pandas writes for a category
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": categorical}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["d"], "label": ["cat"]}), tmp_path / "val.parquet")
    assert load_task_yaml(spec).train.labels.tolist() == [1, 0, 1]

    _hf_dataset(_examples("train"), "text").to_parquet(tmp_path / "train.parquet")
    _hf_dataset(_examples("id_val"), "text").to_parquet(tmp_path / "val.parquet")
    task = load_task_yaml(spec)
    assert task.classes == ("cat", "dog")  # names from the ClassLabel, in the sorted order of every source


# --- refused, naming the source and the row --------------------------------------------------


def _corrupt_parquet(folder: Path) -> tuple[Path, str]:
    spec = _parquet_task(folder, "image")
    (folder / "id_test.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    return spec, r"id_test.parquet: not a readable Parquet file"


def _corrupt_hf(folder: Path) -> tuple[Path, str]:
    spec = _hf_task(folder, "image")
    (arrow,) = (folder / "hf" / "id_val").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    return spec, r"hf/id_val.*not a readable .*saved Hugging Face dataset"


def _corrupt_shard(folder: Path) -> tuple[Path, str]:
    spec = _shards_task(folder, "image")
    shard = folder / "shards" / "train-000001.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(shard.read_bytes()[: last.offset_data + 1])  # cut inside the last member's bytes
    return spec, r"train-000001.tar: ends before member sample0\d+\.\w+ does"


def _broken_symlink(folder: Path) -> tuple[Path, str]:
    spec = _image_folder_task(folder)
    (folder / "images" / "id_test" / "dog" / "99.png").symlink_to(folder / "nowhere.png")
    return spec, r"image .*id_test/dog/99.png does not exist"


@pytest.mark.parametrize("damage", [_corrupt_parquet, _corrupt_hf, _corrupt_shard, _broken_symlink],
                         ids=["parquet", "hf", "webdataset", "image-folder"])
def test_a_bad_file_is_refused_naming_it(tmp_path, damage):
    spec, message = damage(tmp_path)
    with pytest.raises(TaskError, match=message):
        load_task_yaml(spec)


def _relabel(folder: Path, source: str, split: str, label: str) -> None:
    """Give the first example of ``split`` the label ``label``, in ``source``'s own format."""
    i = _examples(split)[0][0]
    rows = [(i, label)] + _examples(split)[1:]
    if source == "image-folder":
        old = folder / "images" / split / _examples(split)[0][1] / f"{i:02d}.png"
        (old.parent.parent / label).mkdir()
        old.rename(old.parent.parent / label / old.name)
        old.parent.rmdir()  # else an empty class folder, which is refused
    elif source == "parquet":
        pq.write_table(pa.table({"image": [_png(j) for j, _ in rows], "label": [b for _, b in rows]}),
                       folder / f"{split}.parquet")
    elif source == "hf":
        data = {"image": [{"bytes": _png(j), "path": None} for j, _ in rows], "label": [b for _, b in rows]}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
        target = folder / "hf" / split
        datasets.Dataset.from_dict(data, features=features).save_to_disk(folder / "hf" / "new")
        for old in target.iterdir():
            old.unlink()
        (folder / "hf" / "new").rename(folder / "hf" / "tmp")
        target.rmdir()
        (folder / "hf" / "tmp").rename(target)
    else:
        _write_shard(folder / "shards" / f"{split}.tar", [_sample(j, b, "image") for j, b in rows])


# where each source names the relabelled example of id_test (example 7)
PLACE = {"image-folder": r"images/id_test\), folder 'bird'", "parquet": r"id_test.parquet\), row 1",
         "hf": r"hf/id_test\), row 1", "webdataset": r"id_test.tar\), id_test.tar:sample0007"}


@pytest.mark.parametrize("source", list(WRITERS))
def test_unknown_label_and_class_missing_from_train_name_the_row(tmp_path, source):
    spec = WRITERS[source](tmp_path, "image")
    _relabel(tmp_path, source, "id_test", "bird")
    with pytest.raises(TaskError, match=rf"split 'id_test' \(.*{PLACE[source]}: unknown label 'bird'"):
        load_task_yaml(spec)
    spec.write_text(spec.read_text().replace("splits:", "classes: [cat, dog, bird]\nsplits:"))
    place = PLACE[source].replace("\\)", "")
    with pytest.raises(TaskError, match=rf"{place}: class 'bird' never occurs in train"):
        load_task_yaml(spec)


def _empty_parquet(folder: Path) -> None:
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.string())}),
                   folder / "id_val.parquet")


def _empty_hf(folder: Path) -> None:
    empty = _hf_dataset(_examples("id_val"), "image").select([])
    empty.save_to_disk(folder / "hf" / "empty")
    (folder / "task.yaml").write_text((folder / "task.yaml").read_text().replace("hf/id_val", "hf/empty"))


def _empty_shard(folder: Path) -> None:
    for shard in (folder / "shards" / "val").iterdir():
        shard.unlink()
    _write_shard(folder / "shards" / "val" / "val-000000.tar", [])


def _empty_image_folder(folder: Path) -> None:
    for file in (folder / "images" / "id_val").rglob("*.png"):
        file.unlink()


EMPTY = {"parquet": (_empty_parquet, r"id_val.parquet: no rows"), "hf": (_empty_hf, r"hf/empty: no rows"),
         "webdataset": (_empty_shard, r"shards/val: no rows"),
         "image-folder": (_empty_image_folder, r"id_val/(cat|dog): class folder holds no image")}


@pytest.mark.parametrize("source", list(WRITERS))
def test_an_empty_split_is_refused_naming_it(tmp_path, source):
    spec = WRITERS[source](tmp_path, "image")
    empty, message = EMPTY[source]
    empty(tmp_path)
    with pytest.raises(TaskError, match=message):
        load_task_yaml(spec)


def test_files_outside_the_task_folder_are_refused_unless_allowed(tmp_path):
    spec = _shards_task(tmp_path / "task", "image")
    outside = tmp_path / "elsewhere.tar"
    (tmp_path / "task" / "shards" / "train-000001.tar").rename(outside)
    (tmp_path / "task" / "shards" / "train-000001.tar").symlink_to(outside)
    with pytest.raises(TaskError, match=r"`splits.train` = .*train-000001.tar resolves to .*elsewhere.tar, outside"):
        load_task_yaml(spec)
    spec.write_text(spec.read_text() + "allow_outside: true\n")
    assert len(load_task_yaml(spec).train) == 5

    spec = _parquet_task(tmp_path / "pq", "image")
    Image.new("RGB", (3, 3)).save(tmp_path / "private.png")
    pq.write_table(pa.table({"path": ["../private.png", "x.png"], "label": ["cat", "dog"]}),
                   tmp_path / "pq" / "id_val.parquet")
    with pytest.raises(TaskError, match=r"id_val.parquet, row 1: image .* resolves to .*private.png, outside"):
        load_task_yaml(spec)

    spec = _image_folder_task(tmp_path / "folder")
    (tmp_path / "folder" / "images" / "train" / "cat" / "link.png").symlink_to(tmp_path / "private.png")
    with pytest.raises(TaskError, match=r"images/train, folder 'cat': image .*link.png resolves to .*private.png"):
        load_task_yaml(spec)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: (f / "images" / "train" / "stray.png").write_bytes(_png(0)), r"stray.png is not inside a class"),
        (lambda f: _write_yaml(f, "text", dict.fromkeys(SPLITS, "images/train/")), r"ImageFolder\) serves image tasks"),
        (lambda f: (f / "x.json").write_text("{}") and _write_yaml(f, "image", dict.fromkeys(SPLITS, "'*.json'")),
         r"`splits.train` = '\*.json' matches \['x.json'\]; a pattern must match only .tar shards or only .parquet"),
        (lambda f: _write_yaml(f, "image", dict.fromkeys(SPLITS, "s-{0..2}.tar")), r"split file .*s-0.tar does not"),
        (lambda f: _write_yaml(f, "image", dict.fromkeys(SPLITS, "'*.parquet'")), r"'\*.parquet' matches no file"),
    ],
    ids=["top-level-image", "text-image-folder", "mixed-pattern", "missing-shard", "no-match"],
)
def test_ambiguous_or_missing_sources_are_refused(tmp_path, change, message):
    _image_folder_task(tmp_path)
    change(tmp_path)
    with pytest.raises(TaskError, match=message):
        load_task_yaml(tmp_path / "task.yaml")


def test_shard_samples_without_a_label_or_with_two_images_are_refused(tmp_path):
    spec = _shards_task(tmp_path, "image")
    _write_shard(tmp_path / "shards" / "id_test.tar", [{"__key__": "a", "png": _png(1), "jpg": _png(2), "cls": "cat"}])
    with pytest.raises(TaskError, match=r"id_test.tar:a: several image members \['jpg', 'png'\]"):
        load_task_yaml(spec)
    _write_shard(tmp_path / "shards" / "id_test.tar", [{"__key__": "a", "png": _png(1)}])
    with pytest.raises(TaskError, match=r"id_test.tar:a: no .cls member; the sample has \['.png'\]"):
        load_task_yaml(spec)


def test_a_dataset_dict_and_a_missing_datasets_package_are_explained(tmp_path, monkeypatch):
    spec = _hf_task(tmp_path, "image")
    datasets.DatasetDict({"train": _hf_dataset(_examples("train"), "image")}).save_to_disk(tmp_path / "dd")
    spec.write_text(spec.read_text().replace("train: hf/train", "train: dd"))
    with pytest.raises(TaskError, match=r"'dd' is a saved DatasetDict .*e.g. dd/train"):
        load_task_yaml(spec)
    spec.write_text(spec.read_text().replace("train: dd", "train: hf/train"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(TaskError, match=r"needs `datasets`: pip install 'lpft\[hf\]'"):
        load_task_yaml(spec)


def test_a_compressed_arrow_file_is_read_into_memory(tmp_path):
    spec = _hf_task(tmp_path, "image")
    (arrow,) = (tmp_path / "hf" / "id_val").glob("*.arrow")
    table = pa.ipc.open_stream(arrow.read_bytes()).read_all()
    with pa.ipc.new_stream(arrow, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    task = load_task_yaml(spec)
    assert all(isinstance(x, InlineImage) for x in task.id_val.inputs)
    assert [load_rgb(x).tobytes() for x in task.id_val.inputs] == [
        load_rgb(io.BytesIO(_png(i))).tobytes() for i, _ in _examples("id_val")]


def test_brace_ranges_keep_zero_padding_and_lists_multiply():
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]


# --- loading never decodes; check_images and `lpft data check` do --------------------------------


def _corrupt_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()[:200]  # the header reads, the pixels do not


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_images_load_then_check_images_lists_every_one(tmp_path, workers):
    spec = _csv_task(tmp_path / "csv", "image")
    (tmp_path / "csv" / "img" / "06.png").write_bytes(_corrupt_jpeg())  # id_val, line 3
    task = load_task_yaml(spec)
    bad = check_images(task, workers=workers)
    assert [(b.split, b.row, b.where) for b in bad] == [
        ("id_val", 1, f"{tmp_path / 'csv' / 'id_val.csv'}, line 3: {tmp_path / 'csv' / 'img' / '06.png'}")]
    assert "Truncated" in bad[0].error

    spec = _shards_task(tmp_path / "wds", "image")
    _write_shard(tmp_path / "wds" / "shards" / "id_test.tar",
                 [{"__key__": "good", "png": _png(1), "cls": "cat"}, {"__key__": "bad", "jpg": _corrupt_jpeg(),
                                                                     "cls": "dog"}])
    bad = check_images(load_task_yaml(spec), workers=workers)
    assert [(b.split, b.where) for b in bad] == [("id_test", "id_test.tar:bad.jpg")]


def test_lpft_data_check_prints_the_bad_files_and_exits_1(tmp_path, monkeypatch, capsys):
    spec = _image_folder_task(tmp_path)
    monkeypatch.chdir(tmp_path)  # the table then shows paths relative to it
    assert cli_main(["data", "check", spec.name, "--workers", "2"]) == 0
    summary = capsys.readouterr().out
    assert re.fullmatch(r"t: decoded 11 images in [\d.]+ s \([\d,]+ images/s, 2 workers\); 0 bad\n", summary)

    (tmp_path / "images" / "id_test" / "dog" / "08.png").write_bytes(_corrupt_jpeg())
    (tmp_path / "images" / "train" / "cat" / "00.png").write_bytes(b"not an image")
    assert cli_main(["data", "check", spec.name, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "2 unreadable images in t" in out and out.splitlines()[-1].endswith("; 2 bad")
    assert re.search(r"│ train +│ images/train/cat/00.png +│ cannot identify image file", out), out
    assert re.search(r"│ id_test +│ images/id_test/dog/08.png +│ Truncated File Read", out), out

    assert cli_main(["data", "check"]) == 2
    assert "takes one task" in capsys.readouterr().err
