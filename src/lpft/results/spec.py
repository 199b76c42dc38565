"""Sweep specs: a YAML file -> a validated :class:`SweepSpec`.

Every key but ``task`` is optional; a method's settings default to its own protocol (its
config's ``default_grid``: for FT and LP-FT the paper's fine-tuning protocol, for LP its C
path). The full format, with every key, is in docs/sweeps.md::

    name: my-sweep                  # default: the spec file's stem
    task: emoji-styles              # a bundled benchmark or a task YAML (relative to this file)
    task_options: {}                # options of a bundled benchmark, e.g. digits: {n_train: 1000}
    backbones:                      # or ``backbone: NAME`` plus ``backbone_options: {...}``
      - {name: efficientnet-lite0, image_size: 64}
    seeds: [0, 1, 2]
    finetune: {epochs: 20}          # settings shared by every method that has them, overridable per method
    methods:
      lp: {C: auto}                 # "auto": the probe's own C path, chosen on id_val; or a list of C
      ft: {lr: [3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]}
      lpft: {lr: [3.0e-6, 1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3]}

A list value is swept (cartesian product); any setting of a method but ``seed`` may be
gridded. ``"auto"`` values that a setting resolves from the task (``batch_size: auto``: the
paper's 64, smaller for small tasks) are resolved when the spec is expanded into trials.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpft.config import MethodConfig, check_value
from lpft.data.files import load_yaml
from lpft.errors import ConfigError, SpecError
from lpft.methods import method_class, method_names

PAPER_SEEDS: tuple[int, ...] = (0, 1, 2)
DEFAULT_METHODS: tuple[str, ...] = ("lp", "ft", "lpft")  # the paper's comparison, when a spec names none
SHARED_KEY = "finetune"
SPEC_KEYS = frozenset({"name", "task", "task_options", "backbone", "backbone_options", "backbones", "seeds",
                       SHARED_KEY, "methods", "device"})


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: what to run, before expansion into trials."""

    name: str
    task: str
    task_options: dict[str, Any]
    backbones: tuple[BackboneSpec, ...]
    seeds: tuple[int, ...]
    methods: dict[str, dict[str, Any]]  # method -> grid (values may be lists)
    device: str = "auto"


def load_spec(path: Path | str) -> SweepSpec:
    """Read and validate a sweep spec YAML; task paths are resolved relative to the spec file."""
    path = Path(path)
    try:
        raw = load_yaml(path, SpecError)
    except OSError as e:
        raise SpecError(f"cannot read sweep spec {path}: {e.strerror}") from e
    return parse_spec(raw, default_name=path.stem, base_dir=path.parent)


def parse_spec(raw: Any, default_name: str = "sweep", base_dir: Path | None = None) -> SweepSpec:
    """Validate a spec given as a mapping (what ``yaml.safe_load`` returns); see the module docstring."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"a sweep spec is a mapping with at least 'task', got {type(raw).__name__}")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)} in sweep spec; allowed: {sorted(SPEC_KEYS)}")
    if not isinstance(raw.get("task"), str) or not raw["task"]:
        raise SpecError("sweep spec needs 'task': a bundled benchmark name or the path of a task YAML")
    task = raw["task"]
    if base_dir is not None and Path(task).suffix in {".yaml", ".yml"}:
        task = str((base_dir / task).resolve())
    task_options = _mapping(raw.get("task_options", {}), "task_options")

    if "backbones" in raw and ("backbone" in raw or "backbone_options" in raw):
        raise SpecError("give either 'backbones' (a list) or 'backbone' (+ 'backbone_options'), not both")
    if "backbones" in raw:
        entries = raw["backbones"]
        if not isinstance(entries, list) or not entries:
            raise SpecError("'backbones' must be a non-empty list of names or {name: ..., <option>: ...} mappings")
    elif "backbone" in raw:
        entries = [{"name": raw["backbone"], **_mapping(raw.get("backbone_options", {}), "backbone_options")}]
    else:
        raise SpecError("sweep spec needs 'backbone' (or 'backbones'), e.g. efficientnet-lite0")
    backbones = tuple(_backbone(e, i) for i, e in enumerate(entries))

    seeds = raw.get("seeds", list(PAPER_SEEDS))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"'seeds' has duplicates: {seeds}")
    for seed in seeds:
        try:
            check_value(MethodConfig, "seed", seed)
        except ConfigError as e:
            raise SpecError(f"'seeds': {e}") from e

    methods_raw = raw.get("methods", list(DEFAULT_METHODS))
    if isinstance(methods_raw, list):
        methods_raw = {m: {} for m in methods_raw}
    methods_raw = _mapping(methods_raw, "methods")
    if not methods_raw:
        raise SpecError("'methods' is empty; list at least one of " + ", ".join(method_names()))
    for method in methods_raw:
        if method not in method_names():
            raise SpecError(f"unknown method {method!r} under 'methods'; choose from {method_names()}")
    shared = _mapping(raw.get(SHARED_KEY, {}), SHARED_KEY)
    _check_shared(shared, list(methods_raw))
    methods = {m: _method_grid(m, _mapping(grid or {}, f"methods.{m}"), shared) for m, grid in methods_raw.items()}

    device = raw.get("device", "auto")
    if not isinstance(device, str):
        raise SpecError(f"'device' must be a string such as auto, cpu or cuda, got {device!r}")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise SpecError(f"'name' must be a non-empty string, got {name!r}")
    return SweepSpec(name, task, task_options, backbones, tuple(seeds), methods, device)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"'{key}' must be a mapping, got {value!r}")
    return dict(value)


def _backbone(entry: Any, index: int) -> BackboneSpec:
    if isinstance(entry, str):
        return BackboneSpec(entry)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise SpecError(f"backbones[{index}] must be a name or a mapping with 'name', got {entry!r}")
    options = {k: v for k, v in entry.items() if k != "name"}
    return BackboneSpec(entry["name"], options)


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; read such strings as the numbers they mean."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_shared(shared: Mapping[str, Any], methods: list[str]) -> None:
    """Shared settings must belong to at least one of the spec's methods; seeds are given once."""
    if "seed" in shared:
        raise SpecError(f"'{SHARED_KEY}' sets 'seed'; seeds are given once, by the top-level 'seeds' list")
    known = set().union(*(method_class(m).config_class.settings() for m in methods)) - {"seed"}
    unknown = set(shared) - known
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)} in '{SHARED_KEY}': no method of this spec ({methods}) has "
                        f"them; allowed: {sorted(known)}")


def _method_grid(method: str, grid: dict[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
    """The method's grid: its own protocol (``default_grid``), then shared settings, then the spec's own."""
    config_class = method_class(method).config_class
    settings = config_class.settings()
    where = f"methods.{method}"
    if "seed" in grid:
        raise SpecError(f"'{where}' sets 'seed'; seeds are given once, by the top-level 'seeds' list")
    unknown = set(grid) - set(settings)
    if unknown:
        raise SpecError(f"unknown key(s) {sorted(unknown)} in '{where}'; {method} has {sorted(set(settings) - {'seed'})}")
    merged = {**config_class.default_grid, **{k: v for k, v in shared.items() if k in settings}, **grid}
    out: dict[str, Any] = {}
    for key, value in merged.items():
        values = [_number(x) for x in value] if isinstance(value, list) else [_number(value)]
        if not values:
            raise SpecError(f"'{where}.{key}' is an empty list")
        try:
            checked = [check_value(config_class, key, v) for v in values]
        except ConfigError as e:
            raise SpecError(f"'{where}.{key}': {e}") from e
        out[key] = checked if isinstance(value, list) else checked[0]
    return out
