"""Tasks from a YAML file of CSV splits.

```yaml
name: my-task
modality: text          # or image
splits:
  train: train.csv      # columns: text,label  (image tasks: path,label; path relative to the CSV)
  id_val: val.csv
  id_test: test.csv
  ood:
    shifted-a: a.csv
```
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import yaml
from PIL import Image

from lpft.data.task import ID_SPLITS, MODALITIES, Split, Task, TaskError, class_names_from_labels, encode_labels

log = logging.getLogger(__name__)

INPUT_COLUMN = {"text": "text", "image": "path"}


def load_task_yaml(path: str | Path, check_images: bool = True) -> Task:
    """Load and validate a task YAML; every error names the file (and row) to fix.

    With ``check_images`` every image is opened and fully decoded once, so a corrupt file
    fails here, naming its CSV row, rather than hours into training.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: expected a mapping with name, modality and splits")
    name = str(spec.get("name") or path.stem)
    modality = spec.get("modality")
    if modality not in MODALITIES:
        raise TaskError(f"{path}: `modality` must be one of {list(MODALITIES)}, got {modality!r}")
    splits = spec.get("splits")
    if not isinstance(splits, dict):
        raise TaskError(f"{path}: `splits` must map train, id_val, id_test (and optionally ood) to CSV files")
    missing = [k for k in ID_SPLITS if k not in splits]
    if missing:
        raise TaskError(f"{path}: `splits` is missing {missing}")
    unknown = sorted(set(splits) - set(ID_SPLITS) - {"ood"})
    if unknown:
        raise TaskError(f"{path}: unknown split keys {unknown}; OOD splits go under `splits.ood`")
    ood = splits.get("ood") or {}
    if not isinstance(ood, dict):
        raise TaskError(f"{path}: `splits.ood` must map OOD split names to CSV files")

    csv_paths = {k: path.parent / splits[k] for k in ID_SPLITS}
    csv_paths.update({f"ood/{k}": path.parent / v for k, v in ood.items()})
    rows = {k: _read_csv(p, modality) for k, p in csv_paths.items()}
    classes = spec.get("classes")
    classes = tuple(str(c) for c in classes) if classes else class_names_from_labels(_labels_as_read(rows["train"][1]))

    built: dict[str, Split] = {}
    for key, (inputs, labels) in rows.items():
        source = str(csv_paths[key])
        if modality == "image":
            inputs = [csv_paths[key].parent / p for p in inputs]
            if check_images:
                _check_images(inputs, source)
        built[key] = Split(key, inputs, encode_labels(labels, classes, key, source), source)
    return Task(
        name=name,
        modality=modality,
        classes=classes,
        train=built["train"],
        id_val=built["id_val"],
        id_test=built["id_test"],
        ood={k.removeprefix("ood/"): v for k, v in built.items() if k.startswith("ood/")},
    )


def _labels_as_read(labels: list[str]) -> list:
    """CSV labels are strings; treat an all-integer column as integers so 10 sorts after 9."""
    try:
        return [int(v) for v in labels]
    except ValueError:
        return labels


def _read_csv(path: Path, modality: str) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise TaskError(f"split file {path} does not exist")
    column = INPUT_COLUMN[modality]
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if column not in header or "label" not in header:
            raise TaskError(f"{path}: needs columns {column!r} and 'label' for a {modality} task; header is {header}")
        inputs, labels = [], []
        for row_number, row in enumerate(reader, start=2):  # row 1 is the header
            value, label = row.get(column), row.get("label")
            if value is None or label is None or label.strip() == "" or value == "":
                raise TaskError(f"{path}, row {row_number}: empty {column!r} or 'label'")
            inputs.append(value)
            labels.append(label.strip())
    if not labels:
        raise TaskError(f"{path}: no rows; every split needs examples")
    return inputs, labels


def _check_images(paths: list[Path], source: str) -> None:
    for row, p in enumerate(paths, start=2):
        if not p.is_file():
            raise TaskError(f"{source}, row {row}: image {p} does not exist")
        try:
            with Image.open(p) as img:
                img.load()
        except Exception as exc:  # PIL raises many types for bad files
            raise TaskError(f"{source}, row {row}: cannot read image {p}: {exc}") from exc
