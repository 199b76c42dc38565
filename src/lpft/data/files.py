"""Tasks from a YAML file naming one source per split; the format and every rule are in docs/tasks.md.

```yaml
name: my-task
modality: text          # or image
classes: [neg, pos]     # optional; default: the sorted distinct training labels
allow_outside: false    # optional; true lets split files and image paths leave this file's folder
splits:
  train: train.csv      # columns: text,label  (image tasks: path,label; path relative to the CSV)
  id_val: val.parquet   # or Parquet file(s): text / image or path, and label columns
  id_test: hf/test/     # or a saved Hugging Face dataset, an ImageFolder, WebDataset shards
  ood:
    shifted-a: shards/a-{000000..000003}.tar
```

A split's kind is told by what it names: a ``.csv`` file, a ``.parquet`` file or pattern, a
folder holding ``dataset_info.json``/``state.json`` (``datasets``' ``save_to_disk``), ``.tar``
shards (a file, a pattern or a folder of them), or a folder of class folders (ImageFolder).
The readers beyond CSV are in :mod:`lpft.data.sources`.

Bad input is refused, never guessed at: unknown or repeated keys, wrong types, CSV files that
are not UTF-8, duplicated columns, rows with a stray field, blank texts, unknown labels, and
paths that leave the task's folder. Every error names the file, shard or folder, and the row
(a CSV's line as an editor shows it: the header is line 1). Images are checked to exist but
never decoded here: ``lpft data check`` (:func:`lpft.data.check.check_images`) decodes them.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from lpft.data.sources import (
    HF_MARKERS,
    Rows,
    expand_braces,
    hf_data_files,
    read_hf_dataset,
    read_image_folder,
    read_parquet,
    read_shards,
)
from lpft.data.task import ID_SPLITS, MODALITIES, Split, Task, TaskError, class_names_from_labels, encode_labels
from lpft.errors import LpftError

INPUT_COLUMN = {"text": "text", "image": "path"}
KNOWN_KEYS: tuple[str, ...] = ("name", "modality", "classes", "allow_outside", "splits")
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class CsvRows:
    """The input and label columns of one CSV, with the line each row starts on."""

    inputs: list[str]
    labels: list[str]
    lines: list[int]


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: list = []
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden, by design
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_task_yaml(path: str | Path) -> Task:
    """Load and validate a task YAML; every error names the file (and line or row) to fix.

    Split files and image paths must resolve, symlinks followed, inside the YAML's folder
    unless the YAML sets ``allow_outside: true``. Every image is checked to exist (one stat)
    but not decoded, so that a task of 100,000 image files loads in about 1.5 s;
    :func:`lpft.data.check.check_images` (``lpft data check``) decodes them all, in parallel.
    """
    path = Path(path)
    if Path(os.path.realpath(path)).suffix.lower() not in YAML_SUFFIXES:
        raise TaskError(f"task file {path} must be a YAML file ending in .yaml or .yml")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    spec = _read_yaml(path)
    allow_outside = spec.get("allow_outside", False)
    if not isinstance(allow_outside, bool):
        raise TaskError(f"{path}: `allow_outside` must be true or false, got {_describe(allow_outside)}")
    modality = spec.get("modality")
    name = spec.get("name") or path.stem
    if not isinstance(name, str):
        raise TaskError(f"{path}: `name` must be a string, got {_describe(name)}; quote it")
    classes = _classes(spec.get("classes"), path)

    root = Path(os.path.realpath(path.parent))
    sources: dict[str, str] = {}
    rows: dict[str, Rows] = {}
    for key, value, yaml_key in _split_files(spec, path):
        sources[key], rows[key] = _read_split(path, root, yaml_key, value, allow_outside, modality)
        if not rows[key].labels:
            raise TaskError(f"{sources[key]}: no rows; every split needs examples")
    if classes is None:
        classes = class_names_from_labels(_labels_as_read(rows["train"].labels))

    built: dict[str, Split] = {}
    real_path = _RealPaths()
    for key, r in rows.items():
        if modality == "image":
            _check_image_paths(r, sources[key], root, allow_outside, path, real_path)
        labels = encode_labels(r.labels, classes, key, sources[key], r.where)
        built[key] = Split(key, r.inputs, labels, sources[key], r.lines)
    _check_classes_in_train(built, rows, classes)
    return Task(
        name=name,
        modality=modality,
        classes=classes,
        train=built["train"],
        id_val=built["id_val"],
        id_test=built["id_test"],
        ood={k.removeprefix("ood/"): v for k, v in built.items() if k.startswith("ood/")},
    )


def load_yaml(path: Path, error: type[LpftError] = TaskError) -> object:
    """A YAML file's data, read safely (no Python tags) and strictly (a key given twice is refused).

    Errors are one ``error`` line naming the file, the line and column, and the problem, never
    quoting the file.
    """
    raw = path.read_bytes()
    try:
        return yaml.load(raw, Loader=_StrictLoader)  # bytes: PyYAML detects UTF-8/16 and a BOM
    except yaml.reader.ReaderError as exc:
        line = len((raw[: exc.position] + b"x").splitlines())
        raise error(f"{path}, line {line}: not UTF-8 ({exc.reason}); save the file as UTF-8") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML: {exc.problem or exc.context}") from None


def _read_yaml(path: Path) -> dict:
    """The task mapping, with only known keys and a valid ``modality``."""
    spec = load_yaml(path)
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: expected a mapping with name, modality and splits")
    unknown = [k for k in spec if k not in KNOWN_KEYS]
    if unknown:
        raise TaskError(f"{path}: unknown keys {unknown}; the known keys are {list(KNOWN_KEYS)}")
    modality = spec.get("modality")
    if modality not in MODALITIES:
        raise TaskError(f"{path}: `modality` must be one of {list(MODALITIES)}, got {modality!r}")
    return spec


def _split_files(spec: dict, path: Path) -> list[tuple[str, str, str]]:
    """``(split key, CSV name, YAML key)`` for the ID splits, then ``ood/<name>`` for each OOD split."""
    splits = spec.get("splits")
    if not isinstance(splits, dict):
        raise TaskError(f"{path}: `splits` must map train, id_val, id_test (and optionally ood) to CSV files")
    missing = [k for k in ID_SPLITS if k not in splits]
    if missing:
        raise TaskError(f"{path}: `splits` is missing {missing}")
    unknown = [k for k in splits if k not in ID_SPLITS and k != "ood"]
    if unknown:
        raise TaskError(f"{path}: unknown split keys {unknown}; OOD splits go under `splits.ood`")
    ood = splits.get("ood") or {}
    if not isinstance(ood, dict):
        raise TaskError(f"{path}: `splits.ood` must map OOD split names to CSV files, got {_describe(ood)}")
    files = [(k, splits[k], f"splits.{k}") for k in ID_SPLITS]
    for name, value in ood.items():
        if not isinstance(name, str) or not name:
            raise TaskError(f"{path}: OOD split names under `splits.ood` must be strings, got {_describe(name)}")
        files.append((f"ood/{name}", value, f"splits.ood.{name}"))
    for _, value, yaml_key in files:
        if not isinstance(value, str) or not value.strip():
            raise TaskError(f"{path}: `{yaml_key}` must be a CSV file name (a string), got {_describe(value)}")
    return files


def _classes(classes: object, path: Path) -> tuple[str, ...] | None:
    """The ``classes`` list as strings, or ``None`` when absent (then they come from train)."""
    if classes is None:
        return None
    if not isinstance(classes, list):
        raise TaskError(f"{path}: `classes` must be a list of class names, e.g. [cat, dog]; got {_describe(classes)}")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (str, int))]
    if bad:
        raise TaskError(
            f"{path}: `classes` must hold names (strings or integers); {bad[0]!r} is a {type(bad[0]).__name__}. "
            "Quote it (YAML reads yes/no/true/false as booleans)"
        )
    return tuple(str(c) for c in classes)


_PATTERN = re.compile(r"[*?[]|\{[^{}]*\}")  # a glob or a brace group: the value names several files


def _read_split(
    spec: Path, root: Path, yaml_key: str, value: str, allow_outside: bool, modality: str
) -> tuple[str, Rows]:
    """``(source, rows)`` of one split, its kind told by what ``value`` names.

    Every file is judged by where it resolves (outside the task folder: refused unless
    allowed) before it is read, and a file of an unknown kind is never read nor quoted.
    """
    target = spec.parent / value
    if _PATTERN.search(value):
        files = _matched_files(spec, root, yaml_key, value, allow_outside)
        kinds = {f.suffix.lower() for f in files}
        if kinds == {".tar"}:
            return str(target), read_shards(files, modality)
        if kinds == {".parquet"}:
            return str(target), read_parquet(files, modality)
        raise TaskError(
            f"{spec}: `{yaml_key}` = {value!r} matches {[f.name for f in files][:5]}; a pattern must match only "
            ".tar shards or only .parquet files"
        )
    real = _inside(spec, root, yaml_key, value, target, allow_outside)
    if real.is_dir():
        return str(target), _read_folder(spec, root, yaml_key, value, target, allow_outside, modality)
    suffix = real.suffix.lower()
    if suffix not in (".csv", ".parquet", ".tar") and real.exists():  # never read, nor quote, such a file
        raise TaskError(
            f"{spec}: `{yaml_key}` = {value!r} resolves to {real}, which is not a .csv file, a .parquet file, "
            "a .tar shard nor a folder"
        )
    if not real.is_file():
        raise TaskError(f"split file {target} does not exist (`{yaml_key}` in {spec})")
    if suffix == ".parquet":
        return str(target), read_parquet([target], modality)
    if suffix == ".tar":
        return str(target), read_shards([target], modality)
    r = read_csv(target, modality)
    inputs = [target.parent / p for p in r.inputs] if modality == "image" else r.inputs
    return str(target), Rows(inputs, r.labels, lambda row: f"line {r.lines[row]}", r.lines)


def _read_folder(
    spec: Path, root: Path, yaml_key: str, value: str, folder: Path, allow_outside: bool, modality: str
) -> Rows:
    """A folder split: a saved Hugging Face dataset, a folder of ``.tar`` shards, or an ImageFolder."""
    if (folder / "dataset_dict.json").is_file():
        raise TaskError(
            f"{spec}: `{yaml_key}` = {value!r} is a saved DatasetDict (several splits); name one split's folder, "
            f"e.g. {value.rstrip('/')}/train"
        )
    if any((folder / marker).is_file() for marker in HF_MARKERS):
        files = hf_data_files(folder)
        for file in files:
            _inside(spec, root, yaml_key, value, file, allow_outside)
        return read_hf_dataset(folder, files, modality)
    with os.scandir(folder) as entries:
        shards = sorted(Path(e.path) for e in entries if e.name.lower().endswith(".tar") and e.is_file())
    if shards:
        for shard in shards:
            _inside(spec, root, yaml_key, value, shard, allow_outside)
        return read_shards(shards, modality)
    if modality != "image":
        raise TaskError(
            f"{spec}: `{yaml_key}` = {value!r} is a folder holding neither .tar shards nor a saved Hugging Face "
            "dataset; a folder of class folders (ImageFolder) serves image tasks only"
        )
    return read_image_folder(folder)


def _matched_files(spec: Path, root: Path, yaml_key: str, value: str, allow_outside: bool) -> list[Path]:
    """The files a brace range or glob names, in order (a range's, then sorted), each judged as a split file."""
    files: list[Path] = []
    for expanded in expand_braces(value):
        full = spec.parent / expanded
        matches = sorted(Path(p) for p in glob.glob(str(full))) if _PATTERN.search(expanded) else [full]
        files.extend(f for f in matches if f not in files)
    if not files:
        raise TaskError(f"{spec}: `{yaml_key}` = {value!r} matches no file")
    for file in files:
        _inside(spec, root, yaml_key, value, file, allow_outside)
        if not file.is_file():
            raise TaskError(f"split file {file} does not exist (`{yaml_key}` = {value!r} in {spec})")
    return files


def _inside(spec: Path, root: Path, yaml_key: str, value: str, file: Path, allow_outside: bool) -> Path:
    """Where ``file`` resolves (symlinks followed), refused when outside ``root`` unless allowed."""
    real = Path(os.path.realpath(file))
    if not allow_outside and not real.is_relative_to(root):
        shown = repr(value) if file == spec.parent / value else f"{value!r}: {file}"
        raise TaskError(
            f"{spec}: `{yaml_key}` = {shown} resolves to {real}, outside the task folder {root}; "
            "move the file into that folder or set `allow_outside: true`"
        )
    return real


def _describe(value: object) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _labels_as_read(labels: list[str]) -> list:
    """Labels as read (strings, or ints from Parquet or Arrow); an all-integer column counts as integers, so 10
    sorts after 9."""
    try:
        return [int(v) for v in labels]
    except ValueError:
        return labels


def read_csv(path: Path, modality: str, labelled: bool = True) -> CsvRows:
    """The input and label columns of a UTF-8 CSV (a leading byte-order mark is allowed).

    With ``labelled=False`` (inputs to predict) the label column is optional: labels are
    read where the column exists and are empty strings otherwise.

    Refused, naming the line: bytes that are not UTF-8, malformed quoting, a duplicated
    column, a row whose field count differs from the header's, an empty or whitespace-only
    input, an empty label. Blank lines are skipped; labels are stripped, inputs kept as is.
    """
    column = INPUT_COLUMN[modality]
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):  # spreadsheets write one
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = len((raw[: exc.start] + b"x").splitlines())
        raise TaskError(
            f"{path}, line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 (perhaps latin-1 or cp1252); "
            "re-save the file as UTF-8 (a spreadsheet's 'CSV UTF-8')"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise TaskError(f"{path}: empty file; line 1 must be the header {column},label")
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise TaskError(f"{path}, line 1: column {duplicated[0]!r} appears more than once in the header {header}")
        if column not in header or ("label" not in header and labelled):
            raise TaskError(
                f"{path}, line 1: needs columns {column!r} and 'label' for a {modality} task; header is {header}"
            )
        input_at, label_at = header.index(column), header.index("label") if "label" in header else None
        rows = CsvRows([], [], [])
        end = reader.line_num
        for row in reader:
            line, end = end + 1, reader.line_num  # a quoted field may span lines: report where the row starts
            if not row:
                continue
            if len(row) != len(header):
                raise TaskError(
                    f"{path}, line {line}: {len(row)} fields but the header has {len(header)}; "
                    "quote a field that contains a comma"
                )
            value, label = row[input_at], "" if label_at is None else row[label_at].strip()
            if not value.strip():
                raise TaskError(f"{path}, line {line}: {column!r} is {'empty' if not value else 'only whitespace'}")
            if not label and labelled:
                raise TaskError(f"{path}, line {line}: 'label' is empty")
            rows.inputs.append(value)
            rows.labels.append(label)
            rows.lines.append(line)
    except csv.Error as exc:
        raise TaskError(f"{path}, line {reader.line_num}: not valid CSV: {exc}") from None
    if not rows.labels:
        raise TaskError(f"{path}: no rows; every split needs examples")
    return rows


class _RealPaths:
    """Resolves paths (symlinks followed), resolving each parent folder once: one lstat per file."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            return os.path.realpath(path)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(folder)
        real = os.path.join(real_folder, name)
        return os.path.realpath(real) if os.path.islink(real) else real


def _check_image_paths(
    rows: Rows, source: str, root: Path, allow_outside: bool, spec: Path, real_path: _RealPaths
) -> None:
    """Refuse image paths outside ``root`` (unless allowed) and missing ones: one stat each, no decoding."""
    inside = os.path.join(root, "")
    for row, p in enumerate(rows.inputs):
        if not isinstance(p, Path):  # a shard member or bytes: their file was judged already
            continue
        if not allow_outside and not (real := real_path(p)).startswith(inside):
            raise TaskError(
                f"{source}, {rows.where(row)}: image {p} resolves to {real}, outside the task folder {root}; "
                f"move it into that folder or set `allow_outside: true` in {spec}"
            )
        if not os.path.isfile(p):
            raise TaskError(f"{source}, {rows.where(row)}: image {p} does not exist")


def _check_classes_in_train(built: dict[str, Split], rows: dict[str, Rows], classes: tuple[str, ...]) -> None:
    """Refuse an evaluation row whose class never occurs in train, naming its line (or row, shard member, folder)."""
    trained = np.unique(built["train"].labels)
    for key, split in built.items():
        unseen = np.flatnonzero(~np.isin(split.labels, trained))
        if unseen.size:
            i = unseen[0]
            raise TaskError(
                f"{split.source}, {rows[key].where(i)}: class {classes[split.labels[i]]!r} never occurs in "
                f"train ({built['train'].source}); a model cannot learn it. Remove those rows or add training examples."
            )
