"""Split sources beyond CSV: Parquet files, saved Hugging Face datasets, WebDataset tar shards
and ImageFolder directories (the formats, and what is refused, are in docs/tasks.md).

Each reader returns :class:`Rows`, the inputs and the labels as read plus where each row is,
so that :mod:`lpft.data.files` applies one set of rules to every source (known labels, classes
in train, paths inside the task folder) and every error names the file, shard or folder and
the row. Nothing is decoded: an image row is a :class:`~pathlib.Path`, a
:class:`~lpft.data.images.FileRange` (a tar member, or the bytes of a memory-mapped Arrow file)
or an :class:`~lpft.data.images.InlineImage` (Parquet bytes); ``lpft data check`` decodes.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lpft.data.images import IMAGE_SUFFIXES, FileRange, InlineImage
from lpft.errors import TaskError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

HF_INSTALL = "pip install 'lpft[hf]'"
HF_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json")  # what `Dataset.save_to_disk` writes
TEXT_MEMBER = "txt"
LABEL_MEMBER = "cls"
_IMAGE_MEMBERS = frozenset(s.removeprefix(".") for s in IMAGE_SUFFIXES)
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # WebDataset skips these members (shard metadata)
_MEMBER_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext: key, then every suffix


@dataclass(frozen=True)
class Rows:
    """One split's inputs and labels as read (strings or ints), and where each row is.

    ``where(row)`` (0-based row) completes ``"<source>, "`` in an error: ``line 5`` of a CSV,
    ``row 17`` of a Parquet file, ``train-000001.tar:key`` of shards, ``folder 'cat'`` of an
    ImageFolder. ``lines`` is set for CSV only.
    """

    inputs: list
    labels: list
    where: Callable[[int], str]
    lines: list[int] | None = None


# --- ImageFolder -----------------------------------------------------------------------------


def read_image_folder(folder: Path) -> Rows:
    """``folder/<class>/<...>/<file>`` for every image file, classes and files sorted.

    Scanned with ``os.scandir`` (a task of 100,000 files loads in about 1.5 s); folders whose
    name starts with a dot (``.ipynb_checkpoints``) are skipped, as are files that are not
    images (``README``, ``.DS_Store``). Refused: an image at the top level (it has no class), a
    class folder holding no image, a broken symlink.
    """
    classes: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                classes.append(entry.name)
            elif _is_image_name(entry.name):
                raise TaskError(
                    f"{folder}: image {entry.name} is not inside a class folder; an ImageFolder holds "
                    "<class>/<file>, so move it into the folder of its class"
                )
    if not classes:
        raise TaskError(f"{folder}: no class folders; an ImageFolder holds <class>/<file> (e.g. cat/001.jpg)")
    inputs: list[Path] = []
    labels: list[str] = []
    for name in sorted(classes):
        files = sorted(_image_files(folder / name))
        if not files:
            raise TaskError(
                f"{folder / name}: class folder holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        inputs.extend(Path(f) for f in files)
        labels.extend([name] * len(files))
    return Rows(inputs, labels, lambda row: f"folder {labels[row]!r}")


def _image_files(folder: Path) -> Iterator[str]:
    """Image files under ``folder``, recursively, dot-folders skipped; a broken symlink is refused."""
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(entry.path)
                elif _is_image_name(entry.name):
                    if not entry.is_file():
                        raise TaskError(f"image {entry.path} does not exist (a broken symlink?)")
                    yield entry.path


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# --- WebDataset tar shards ---------------------------------------------------------------------


def read_shards(shards: list[Path], modality: str) -> Rows:
    """Every sample of ``shards``, indexed from the tar headers alone (image bytes are never read).

    Members group into samples as WebDataset groups them: consecutive members sharing a key
    (the name up to the first dot of its base name); the rest of the name, lower-cased, is the
    member's kind (``jpg``, ``cls``, ``seg.png``). Each sample needs a ``.cls`` member (a class
    name or index, UTF-8 text) and one image member (image tasks) or a ``.txt`` member (text
    tasks). Metadata members (``__name__``) and other kinds are ignored.
    """
    inputs: list = []
    labels: list[str] = []
    places: list[str] = []
    for shard in shards:
        for key, members, texts in _samples(shard):
            at = f"{shard}:{key}"
            label = _text(texts, members, LABEL_MEMBER, at).strip()
            if not label:
                raise TaskError(f"{at}: its .{LABEL_MEMBER} member (the label) is empty")
            if modality == "text":
                text = _text(texts, members, TEXT_MEMBER, at)
                if not text.strip():
                    raise TaskError(f"{at}: its .{TEXT_MEMBER} member is {'empty' if not text else 'only whitespace'}")
                inputs.append(text)
            else:
                images = sorted(kind for kind in members if kind in _IMAGE_MEMBERS)
                if len(images) != 1:
                    found = "no image member" if not images else f"several image members {images}"
                    raise TaskError(f"{at}: {found}; each sample needs one of .{', .'.join(sorted(_IMAGE_MEMBERS))}")
                member = members[images[0]]
                inputs.append(FileRange(str(shard), member.offset_data, member.size, f"{shard.name}:{member.name}"))
            labels.append(label)
            places.append(f"{shard.name}:{key}")
    return Rows(inputs, labels, places.__getitem__)


Sample = tuple[str, dict[str, tarfile.TarInfo], dict[str, bytes]]


def _samples(shard: Path) -> Iterator[Sample]:
    """``(key, {kind: member}, {kind: bytes})`` per sample of one uncompressed shard, in shard order.

    Only the small ``.cls`` and ``.txt`` members are read (the bytes); images are located only.
    """
    size = shard.stat().st_size
    try:
        tar = tarfile.open(shard, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise TaskError(f"{shard}: not a readable uncompressed tar shard: {exc}") from None
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, bytes] = {}
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as exc:
                raise TaskError(f"{shard}: damaged tar shard, {tar.offset} bytes in: {exc}") from None
            if member is None:
                break
            tar.members = []  # the index keeps offsets only; TarFile would keep every header
            if not member.isreg() or _META_MEMBER.match(member.name):
                continue
            match = _MEMBER_KEY.match(member.name)
            if match is None:  # no dot: WebDataset skips it too
                continue
            if member.offset_data + member.size > size:
                raise TaskError(f"{shard}: ends before member {member.name} does (a truncated shard?)")
            prefix, kind = match.group(1), match.group(2).lower()
            if prefix != key:
                if key is not None:
                    yield key, members, texts
                key, members, texts = prefix, {}, {}
            if kind in members:
                raise TaskError(f"{shard}: member {member.name} repeats sample {key!r}'s .{kind} member")
            members[kind] = member
            if kind in (LABEL_MEMBER, TEXT_MEMBER):
                texts[kind] = tar.extractfile(member).read()
    if key is not None:
        yield key, members, texts


def _text(texts: dict[str, bytes], members: dict[str, tarfile.TarInfo], kind: str, at: str) -> str:
    """The UTF-8 text of a sample's ``.cls`` or ``.txt`` member."""
    if kind not in texts:
        raise TaskError(f"{at}: no .{kind} member; the sample has {sorted('.' + k for k in members)}")
    try:
        return texts[kind].decode("utf-8")
    except UnicodeDecodeError:
        raise TaskError(f"{at}.{kind}: not UTF-8 text") from None


# --- Parquet -------------------------------------------------------------------------------------


def read_parquet(files: list[Path], modality: str) -> Rows:
    """The input and ``label`` columns of one or more Parquet files, read with pyarrow.

    The input column is ``text`` (text tasks), or ``image`` (encoded bytes, or a Hugging Face
    Image struct ``{bytes, path}``) else ``path`` (image tasks; relative to the Parquet file).
    Integer labels become the names of a Hugging Face ``ClassLabel`` when the file's metadata
    carries one. A row is ``row N`` (1-based, in its file); image bytes are copied into memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs: list = []
    labels: list = []
    starts: list[int] = []
    for file in files:
        try:
            reader = pq.ParquetFile(file)
            column = _input_column(reader.schema_arrow.names, modality, file)
            table = reader.read(columns=[column, "label"])
        except (pa.ArrowException, OSError) as exc:
            raise TaskError(f"{file}: not a readable Parquet file: {exc}") from None
        names = _class_label_names(reader.schema_arrow.metadata, file)
        starts.append(len(labels))
        read = _Columns(file, file.parent, lambda row, f=file: f"{f}, row {row + 1}",
                        lambda row, f=file.name: f"{f}, row {row + 1}")
        labels.extend(read.labels(table.column("label"), names))
        inputs.extend(read.texts(table.column(column)) if modality == "text" else read.images(table.column(column)))
    if len(files) == 1:
        return Rows(inputs, labels, lambda row: f"row {row + 1}")

    def where(row: int) -> str:
        i = bisect.bisect_right(starts, row) - 1
        return f"{files[i].name}, row {row - starts[i] + 1}"

    return Rows(inputs, labels, where)


def _class_label_names(metadata: dict[bytes, bytes] | None, file: Path) -> list[str] | None:
    """The ``label`` column's ClassLabel names from the Hugging Face schema metadata, if any."""
    raw = (metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"].get("label") or {}
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TaskError(f"{file}: its Hugging Face metadata (schema key 'huggingface') is not readable") from None


# --- saved Hugging Face datasets -----------------------------------------------------------------


def hf_data_files(folder: Path) -> list[Path]:
    """The ``.arrow`` files of a folder written by ``Dataset.save_to_disk``, from its ``state.json``.

    Read before ``datasets`` opens anything, so that a file outside the task folder is refused first.
    """
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TaskError(f"{folder}: not a readable saved Hugging Face dataset (state.json: {exc!r})") from None
    if not names:  # what `save_to_disk` writes for a dataset of no rows
        raise TaskError(f"{folder}: no rows; every split needs examples")
    if any(not isinstance(n, str) or Path(n).name != n for n in names):
        raise TaskError(f"{folder}: state.json names data files outside the dataset folder: {names}")
    return [folder / name for name in names]


def read_hf_dataset(folder: Path, files: list[Path], modality: str) -> Rows:
    """A dataset saved with ``Dataset.save_to_disk``, loaded with ``datasets.load_from_disk``.

    Columns as for Parquet; a ``ClassLabel`` label maps to its names. Image bytes are not
    copied: each row is a :class:`FileRange` of the memory-mapped ``.arrow`` file (of
    ``files``, in order) they lie in. A row is ``row N`` (1-based, in the dataset).
    """
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"{folder} is a saved Hugging Face dataset; reading it needs `datasets`: {HF_INSTALL}"
        ) from None
    import pyarrow as pa

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise TaskError(f"{folder}: not a readable saved Hugging Face dataset: {exc}") from None
    column = _input_column(list(dataset.column_names), modality, folder)
    label = dataset.features["label"]
    names = [str(n) for n in label.names] if isinstance(label, datasets.ClassLabel) else None
    inputs: list = []
    labels: list = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                region = source.read_buffer()  # the whole file, zero-copy: where its bytes lie in memory
                source.seek(0)
                for batch in pa.ipc.open_stream(source):
                    first = len(labels)
                    read = _Columns(folder, folder, lambda row, s=first: f"{folder}, row {s + row + 1}",
                                    lambda row, s=first: f"{folder.name}, row {s + row + 1}", (file, region))
                    labels.extend(read.labels(batch.column("label"), names))
                    column_values = batch.column(column)
                    inputs.extend(read.texts(column_values) if modality == "text" else read.images(column_values))
        except (pa.ArrowException, OSError) as exc:
            raise TaskError(f"{file}: not a readable Arrow file of a saved Hugging Face dataset: {exc}") from None
    if len(labels) != dataset.num_rows:
        raise TaskError(f"{folder}: its .arrow files hold {len(labels)} rows but the dataset has "
                        f"{dataset.num_rows}; save it again with `save_to_disk`")
    return Rows(inputs, labels, lambda row: f"row {row + 1}")


# --- Arrow columns (Parquet and saved datasets) ---------------------------------------------------


def _input_column(columns: list[str], modality: str, where: Path) -> str:
    """The input column a task reads: ``text``; for images ``image``, else ``path``."""
    wanted = ("text",) if modality == "text" else ("image", "path")
    column = next((c for c in wanted if c in columns), None)
    if column is None or "label" not in columns:
        need = "'text'" if modality == "text" else "'image' (or 'path')"
        raise TaskError(f"{where}: needs columns {need} and 'label' for a {modality} task; columns are {columns}")
    return column


@dataclass(frozen=True)
class _Columns:
    """Reads the columns of one Parquet table or Arrow batch of ``source`` (a file or dataset folder).

    ``at(row)`` names a row in an error (``train.parquet, row 3``), ``image_name(row)`` names an
    image reference; relative paths are relative to ``folder``. ``mapped``, for a saved dataset,
    is its ``.arrow`` file and the memory map of it, so bytes lying in the map become file ranges.
    """

    source: Path
    folder: Path
    at: Callable[[int], str]
    image_name: Callable[[int], str]
    mapped: tuple[Path, pa.Buffer] | None = None

    def labels(self, column: pa.Array | pa.ChunkedArray, names: list[str] | None) -> list:
        """Labels as read: stripped strings, or ints (their ClassLabel names, when given)."""
        import pyarrow as pa

        kind = column.type
        if pa.types.is_dictionary(kind):  # a pandas categorical
            column, kind = column.cast(kind.value_type), kind.value_type
        values = column.to_pylist()
        if pa.types.is_integer(kind):
            for row, v in enumerate(values):
                if v is None:
                    raise TaskError(f"{self.at(row)}: 'label' is empty")
                if names is not None and not 0 <= v < len(names):
                    raise TaskError(f"{self.at(row)}: label {v} is not an index of the ClassLabel names {names}")
            return values if names is None else [names[v] for v in values]
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise TaskError(f"{self.source}: column 'label' holds {kind}; labels must be strings or integers")
        for row, v in enumerate(values):
            values[row] = (v or "").strip()
            if not values[row]:
                raise TaskError(f"{self.at(row)}: 'label' is empty")
        return values

    def texts(self, column: pa.Array | pa.ChunkedArray) -> list[str]:
        """Texts kept exactly as written; empty, whitespace-only or missing ones are refused."""
        import pyarrow as pa

        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise TaskError(f"{self.source}: column 'text' holds {column.type}; texts must be strings")
        values = column.to_pylist()
        for row, text in enumerate(values):
            if text is None or not text.strip():
                raise TaskError(f"{self.at(row)}: 'text' is {'only whitespace' if text else 'empty'}")
        return values

    def images(self, column: pa.Array | pa.ChunkedArray) -> list:
        """Image references of an ``image`` or ``path`` column, chunk by chunk (a chunk stays under 2 GiB)."""
        import pyarrow as pa

        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        out: list = []
        for chunk in chunks:
            out.extend(self._image_chunk(chunk, len(out)))
        return out

    def _image_chunk(self, chunk: pa.Array, first: int) -> list:
        import pyarrow as pa

        kind = chunk.type
        fields = [kind.field(i).name for i in range(kind.num_fields)] if pa.types.is_struct(kind) else []
        if {"bytes", "path"} <= set(fields):  # a Hugging Face Image
            children = dict(zip(fields, chunk.flatten()))
            encoded, paths = self._encoded(children["bytes"], first), children["path"].to_pylist()
        elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            encoded, paths = self._encoded(chunk, first), [None] * len(chunk)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            encoded, paths = [None] * len(chunk), chunk.to_pylist()
        else:
            raise TaskError(f"{self.source}: the image column holds {kind}; expected encoded image bytes, "
                            "a Hugging Face Image {bytes, path} or a path")
        out: list = []
        for row, (image, path) in enumerate(zip(encoded, paths)):
            if image is None and not path:
                raise TaskError(f"{self.at(first + row)}: the image is empty (no bytes and no path)")
            out.append(image if image is not None else self.folder / path)
        return out

    def _encoded(self, data: pa.Array, first: int) -> list[FileRange | InlineImage | None]:
        """Per row of a binary array: a reference to its bytes, or ``None`` where it has none."""
        import pyarrow as pa
        import pyarrow.compute as pc

        empty = pc.fill_null(pc.equal(pc.binary_length(data), 0), True).to_numpy(zero_copy_only=False)
        buffer = data.buffers()[2]
        if self.mapped is not None and buffer is not None:
            file, region = self.mapped
            start = buffer.address - region.address
            if 0 <= start and start + buffer.size <= region.size:  # zero-copy: the bytes lie in the file
                width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
                ends = np.frombuffer(data.buffers()[1], dtype=width)[data.offset : data.offset + len(data) + 1]
                return [
                    None if empty[row] else FileRange(str(file), start + int(ends[row]), int(ends[row + 1] - ends[row]),
                                                      self.image_name(first + row))
                    for row in range(len(data))
                ]
        return [None if empty[row] else InlineImage(value, self.image_name(first + row))
                for row, value in enumerate(data.to_pylist())]


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar``, ``a-001.tar``, ``a-002.tar`` (a range keeps the zero
    padding of its first bound); ``{x,y}`` lists alternatives; several groups multiply."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        low, high = numeric.groups()
        choices = [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]
