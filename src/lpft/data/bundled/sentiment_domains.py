"""``sentiment-domains``: review sentiment learnt on Amazon products, tested on Yelp restaurants and IMDb films.

The UCI *Sentiment Labelled Sentences* (Kotzias et al., KDD 2015): 1000 sentences from each
of three review sites, 500 negative and 500 positive, one sentence per review. The npm
package ``sentiment`` ships them verbatim as test fixtures, which is where we take them
from. The task is the same everywhere (is this sentence positive?), only the domain shifts:
product vocabulary in distribution, food and film vocabulary out of it.

Preparation checks every file holds exactly 500 sentences per class (plus the empty record
each fixture ends with), then drops repeated sentences (see :mod:`lpft.data.bundled.texts`)
and every Yelp or IMDb sentence that also occurs in Amazon, so no evaluated sentence is ever
trained on. The seeded, stratified split of Amazon is recomputed on each load.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from lpft.data.bundled.cache import benchmark_dir, load_npz, save_npz_atomic
from lpft.data.bundled.npm import PinnedPackage, fetch_package, pinned
from lpft.data.bundled.texts import dedup_key, pack_texts, split_task, unique_rows
from lpft.data.registry import register_benchmark
from lpft.data.task import Task
from lpft.errors import PackageError

log = logging.getLogger(__name__)

NAME = "sentiment-domains"
# Bump when preparation changes what ends up in the cache.
PREP_VERSION = 1
PACKAGE = "sentiment"
DOMAINS: tuple[str, ...] = ("amazon", "yelp", "imdb")
ID_DOMAIN = "amazon"
CLASSES: tuple[str, ...] = ("negative", "positive")  # the fixtures' class 0 and 1
PER_CLASS = 500


def read_fixture(package: Path, pkg: PinnedPackage, domain: str) -> tuple[list[str], list[int]]:
    """Sentences and labels of ``test/fixtures/<domain>.json``, checked to be 500 per class.

    The file is a JSON list of ``{"text", "class"}`` ending with one empty record
    (``{"text": "", "class": null}``), which is dropped.
    """
    path = package / "test" / "fixtures" / f"{domain}.json"
    where = f"{pkg.spec} package/{path.relative_to(package).as_posix()}"
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PackageError(f"{where}: cannot read the sentences ({e})") from e
    if not isinstance(records, list) or not records or records[-1] != {"text": "", "class": None}:
        raise PackageError(f"{where}: expected a JSON list ending with the empty record {{'text': '', 'class': null}}")
    texts, labels = [], []
    for row, rec in enumerate(records[:-1], 1):
        if not (isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip()
                and rec.get("class") in (0, 1)):
            raise PackageError(f"{where}, record {row}: expected a non-empty text and class 0 or 1, got {rec!r}")
        texts.append(rec["text"].strip())
        labels.append(int(rec["class"]))
    counts = np.bincount(labels, minlength=len(CLASSES)).tolist()
    if counts != [PER_CLASS] * len(CLASSES):
        raise PackageError(
            f"{where}: expected {PER_CLASS} sentences per class {list(CLASSES)}, found {counts}; "
            "the package no longer holds the UCI Sentiment Labelled Sentences as pinned"
        )
    return texts, labels


def prepare() -> dict[str, np.ndarray]:
    """All kept sentences of the three domains with labels and domain index, cached after the first call."""
    path = benchmark_dir(NAME) / f"prepared-v{PREP_VERSION}.npz"
    cached = load_npz(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    pkg = pinned(PACKAGE)
    package = fetch_package(pkg)
    texts: list[str] = []
    labels: list[int] = []
    domains: list[int] = []
    id_keys: frozenset[str] = frozenset()
    for domain in (ID_DOMAIN, *(x for x in DOMAINS if x != ID_DOMAIN)):
        sentences, classes = read_fixture(package, pkg, domain)
        keys = [dedup_key(t) for t in sentences]
        keep = unique_rows(keys, classes, exclude=id_keys)
        if domain == ID_DOMAIN:
            id_keys = frozenset(keys)
        log.info("%s: %d of %d sentences kept", domain, len(keep), len(sentences))
        texts += [sentences[i] for i in keep]
        labels += [classes[i] for i in keep]
        domains += [DOMAINS.index(domain)] * len(keep)
    arrays = {**pack_texts(texts), "labels": np.array(labels, dtype=np.int64), "domains": np.array(domains, np.int64)}
    save_npz_atomic(path, **arrays)
    log.info("prepared %s (%d sentences) in %.1fs -> %s", NAME, len(texts), time.perf_counter() - start, path)
    return arrays


@register_benchmark(NAME)
def load_sentiment_domains(
    n_train: int | None = None, n_val: int = 200, n_test: int = 250, n_ood: int | None = None, seed: int = 0
) -> Task:
    """Amazon as train/id_val/id_test, Yelp and IMDb as OOD ``yelp`` and ``imdb`` (see :func:`texts.split_task`).

    ``n_train=None`` trains on every Amazon sentence not in ``id_val`` or ``id_test``; ``n_ood``
    caps each OOD split (``None`` keeps all).
    """
    return split_task(NAME, prepare(), "domains", DOMAINS, ID_DOMAIN, CLASSES,
                      n_train=n_train, n_val=n_val, n_test=n_test, n_ood=n_ood, seed=seed)
