"""What the bundled text benchmarks share: duplicate detection, compact caching, seeded stratified splits.

Review and tweet corpora repeat themselves (retweets, "Great phone!" twice), and a sentence
seen in training and again in an evaluation split inflates its accuracy. So every text gets
a :func:`dedup_key` that ignores case, links, a leading retweet marker and punctuation, and
only the first of several texts with one key is kept (none, if their labels disagree).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from lpft.data.task import Task
from lpft.errors import TaskError

_URL = re.compile(r"https?://\S*")
_RETWEET = re.compile(r"^(rt\s+@\w+:?\s*)+")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def dedup_key(text: str) -> str:
    """``text`` reduced to what makes two texts the same: lower-case ASCII words, no links or ``RT @x:``."""
    key = _URL.sub(" ", text.casefold()).strip()
    return _NON_ALNUM.sub(" ", _RETWEET.sub("", key)).strip()


def unique_rows(keys: Sequence[str], labels: Sequence[int], exclude: frozenset[str] = frozenset()) -> np.ndarray:
    """Indices of the rows to keep: the first of each key, unless its copies disagree on the label.

    Rows whose key is empty (a text of only links or symbols) or in ``exclude`` are dropped.
    """
    seen: dict[str, set[int]] = {}
    first: dict[str, int] = {}
    for i, (key, label) in enumerate(zip(keys, labels)):
        seen.setdefault(key, set()).add(int(label))
        first.setdefault(key, i)
    return np.array(
        sorted(i for key, i in first.items() if key and key not in exclude and len(seen[key]) == 1), dtype=np.int64
    )


def stratified_split(labels: np.ndarray, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Row indices of each named split, disjoint, each with the class mix of the rows it is drawn from.

    Classes are shuffled with ``seed``; splits are filled in order, each taking from every
    class in proportion to what is left (largest remainders), so a split that takes all
    that is left takes every class exactly. Rows in a split are shuffled (not grouped by class).
    """
    if any(n < 1 for n in sizes.values()) or sum(sizes.values()) > len(labels):
        raise TaskError(f"need positive split sizes summing to at most {len(labels)}, got {dict(sizes)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    taken = np.zeros(len(classes), dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for name, n in sizes.items():
        left = np.array([len(p) for p in pools]) - taken
        share = n * left / left.sum()
        quota = np.floor(share).astype(np.int64)
        quota[np.argsort(quota - share, kind="stable")[: n - quota.sum()]] += 1
        rows = np.concatenate([p[t : t + q] for p, t, q in zip(pools, taken, quota)])
        taken += quota
        out[name] = rng.permutation(rows)
    return out


def pack_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Texts as one UTF-8 byte array plus end offsets: a fraction of numpy's fixed-width ``<U`` size."""
    encoded = [t.encode("utf-8") for t in texts]
    return {
        "text_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "text_ends": np.cumsum([len(b) for b in encoded], dtype=np.int64),
    }


def unpack_texts(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The texts :func:`pack_texts` stored."""
    raw = arrays["text_bytes"].tobytes()
    starts = np.concatenate([[0], arrays["text_ends"][:-1]])
    return [raw[a:b].decode("utf-8") for a, b in zip(starts.tolist(), arrays["text_ends"].tolist())]


def split_task(
    name: str,
    data: Mapping[str, np.ndarray],
    group_key: str,
    groups: Sequence[str],
    id_group: str,
    classes: Sequence[str],
    *,
    n_train: int | None,
    n_val: int,
    n_test: int,
    n_ood: int | None,
    seed: int,
) -> Task:
    """The task of prepared texts (:func:`pack_texts` arrays, ``labels`` and ``data[group_key]``).

    Group ``id_group`` is split into ``id_test``, then ``id_val``, then ``train`` (stratified,
    seeded; ``n_train=None``: all that is left), so ``id_test`` depends only on ``n_test`` and
    ``seed``. Every other group is one OOD split named after it: all its texts, or with
    ``n_ood`` a stratified, seeded subsample of that many keeping the group's class mix.
    """
    if n_ood is not None and n_ood < 1:
        raise TaskError(f"{name}: n_ood must be positive or None (all), got {n_ood}")
    texts = np.array(unpack_texts(data), dtype=object)
    labels = data["labels"]
    names = np.array(classes)[labels]
    rows = np.flatnonzero(data[group_key] == groups.index(id_group))
    sizes = {"id_test": n_test, "id_val": n_val, "train": len(rows) - n_val - n_test if n_train is None else n_train}
    try:
        idx = stratified_split(labels[rows], sizes, seed)
    except TaskError as e:
        raise TaskError(f"{name}: {id_group} has {len(rows)} texts after removing repeats; {e}") from None
    splits = {key: (texts[rows[i]], names[rows[i]]) for key, i in idx.items()}
    ood = {}
    for g, group in enumerate(groups):
        if group == id_group:
            continue
        rows = np.flatnonzero(data[group_key] == g)
        if n_ood is not None and n_ood < len(rows):
            rows = rows[stratified_split(labels[rows], {"ood": n_ood}, seed)["ood"]]
        ood[group] = (texts[rows], names[rows])
    return Task.from_arrays(name, "text", splits=splits, ood=ood, classes=classes)
