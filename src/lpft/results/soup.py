"""Model soups over a sweep's tuned weights: average fine-tuned models instead of picking one.

A soup averages the weights of models fine-tuned from one starting point with different
hyperparameters (Wortsman et al., 2022). Here the ingredients of one soup are the finished
trials of one method, task, backbone and seed in a sweep whose runs were kept
(``lpft sweep --keep-runs DIR``): within a seed every trial starts from the same network
(LP-FT: the same probe head; FT: the same seeded random head), which is what makes their
weights averageable. Two recipes, both chosen on ID validation only:

- **uniform**: the mean of every ingredient;
- **greedy**: ingredients in order of ID-validation accuracy, each added to the soup only
  when the soup's ID-validation accuracy does not drop.

A soup is evaluated on every split like any run and stored in the sweep's database as a
trial of the post-hoc method ``uniform-soup`` or ``greedy-soup`` (its hyperparameters: the
method it soups and the seed; its ingredients in ``diagnostics``), so ``lpft report`` shows
it beside the methods it was made from, with intervals over seeds. A finished soup is kept:
cooking again skips it, unless the sweep's trials of its method changed since (a grid grown
after the soups were cooked), when both recipes are cooked again in place.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpft.backbones import create_backbone
from lpft.data.loader import SplitData
from lpft.data.splits import ID_VAL
from lpft.diagnostics.measure import weight_change
from lpft.errors import RunError
from lpft.evaluation import evaluate
from lpft.results.store import Store, StoredTrial
from lpft.results.sweep import config_hash
from lpft.runs.artifacts import WEIGHTS_FILE, load_run, load_run_task
from lpft.runs.record import backbone_label, environment
from lpft.training import Classifier, predict_logits

log = logging.getLogger(__name__)

RECIPES: tuple[str, ...] = ("uniform", "greedy")


def soup_method(recipe: str) -> str:
    """The post-hoc method name a soup is stored under: ``greedy-soup``."""
    return f"{recipe}-soup"


@dataclass(frozen=True)
class Ingredient:
    """A finished trial whose tuned weights were kept, with its ID-validation accuracy."""

    trial: StoredTrial
    run_dir: Path
    id_val: float


@dataclass
class Soup:
    """One cooked soup: its recipe, the ingredients it holds and its metrics on every split."""

    recipe: str
    ingredients: list[Ingredient]
    metrics: dict[str, dict[str, float]]
    tried: int  # ingredients considered (greedy) or averaged (uniform)
    weight_change: float | None  # ||w - w0|| / ||w0|| against the pretrained backbone; None when it cannot be rebuilt


def ingredients(store: Store, sweep: str, runs_dir: Path, method: str) -> dict[tuple, list[Ingredient]]:
    """The kept runs of ``method``'s finished trials in ``sweep``, grouped by (task, backbone, seed).

    Refuses (RunError) when any of those trials has no kept weights: a soup of the others would
    silently be a soup of fewer models than the sweep ran.
    """
    groups: dict[tuple, list[Ingredient]] = defaultdict(list)
    trials = [t for t in store.trials("finished", sweep) if t.method == method]
    lost = [t for t in trials if not (runs_dir / t.config_hash / WEIGHTS_FILE).is_file()]
    if lost:
        raise RunError(f"{len(lost)} of {len(trials)} finished {method!r} trials of sweep {sweep!r} have no weights "
                       f"kept in {runs_dir}: a soup needs every one; run them into a fresh database with their runs "
                       f"kept (`lpft sweep SPEC --keep-runs {runs_dir}`; `lpft reproduce`: a fresh --out)")
    for trial in trials:
        key = (trial.task, backbone_label(trial.backbone, trial.config.get("backbone_options", {})), trial.seed)
        groups[key].append(Ingredient(trial, runs_dir / trial.config_hash, float(trial.metrics[ID_VAL]["accuracy"])))
    return dict(groups)


def _mean_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The elementwise mean of floating-point tensors; other tensors (BatchNorm's step counter) from the first."""
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


class _Kitchen:
    """The task, the network and its evaluation splits, shared by every soup of one group."""

    def __init__(self, first: Ingredient, device: torch.device) -> None:
        run = load_run(first.run_dir)
        self.task = load_run_task(run)
        # every weight comes from the ingredients: the registry only supplies the architecture and preprocessing
        backbone = create_backbone(run.backbone["name"], **run.backbone["options"])
        # what Δw is measured from, when the registry rebuilt the very weights the runs started from (not a random init)
        self.pretrained = copy.deepcopy(backbone) if backbone.fingerprint == run.backbone["fingerprint"] else None
        self.model = Classifier(backbone, self.task.num_classes).to(device).eval()
        self.device = device
        self.splits = {key: SplitData(backbone, split) for key, split in self.task.eval_splits()}
        self._states: dict[Path, dict[str, torch.Tensor]] = {}

    def state(self, ingredient: Ingredient) -> dict[str, torch.Tensor]:
        if ingredient.run_dir not in self._states:
            from safetensors.torch import load_file

            self._states[ingredient.run_dir] = load_file(str(ingredient.run_dir / WEIGHTS_FILE))
        return self._states[ingredient.run_dir]

    def logits(self, members: Sequence[Ingredient], keys: Sequence[str]) -> dict[str, np.ndarray]:
        self.model.load_state_dict(_mean_state([self.state(m) for m in members]))
        return {k: predict_logits(self.model, self.splits[k], self.device, desc=f"soup {k}", progress=False)
                for k in keys}

    def accuracy(self, members: Sequence[Ingredient]) -> float:
        logits = self.logits(members, [ID_VAL])[ID_VAL]
        return float((logits.argmax(1) == self.task.id_val.labels).mean())


def cook(group: Sequence[Ingredient], device: torch.device) -> list[Soup]:
    """The uniform and the greedy soup of one group of ingredients, evaluated on every split."""
    ranked = sorted(group, key=lambda i: (-i.id_val, i.trial.config_hash))
    kitchen = _Kitchen(ranked[0], device)
    soup, best = [ranked[0]], kitchen.accuracy(ranked[:1])
    for candidate in ranked[1:]:
        accuracy = kitchen.accuracy([*soup, candidate])
        if accuracy >= best:
            soup, best = [*soup, candidate], accuracy
    keys = [k for k, _ in kitchen.task.eval_splits()]
    soups = []
    for recipe, members in (("uniform", ranked), ("greedy", soup)):
        metrics = evaluate(kitchen.task, kitchen.logits(members, keys))  # leaves the soup's weights in the model
        moved = None if kitchen.pretrained is None else weight_change(kitchen.pretrained, kitchen.model.backbone)["total"]
        soups.append(Soup(recipe, members, metrics, len(ranked), None if moved is None else round(moved, 6)))
    return soups


def cook_sweep(db: Path | str, sweep: str, runs_dir: Path | str, method: str, device: torch.device) -> list[dict]:
    """Cook and store every soup of ``method`` in ``sweep``; a summary row per soup (stored now or before)."""
    runs_dir = Path(runs_dir)
    with Store(db) as store:
        groups = ingredients(store, sweep, runs_dir, method)
    if not groups:
        raise RunError(f"no finished {method!r} trials in sweep {sweep!r} to make soups of")
    rows = []
    for (task, backbone, seed), group in sorted(groups.items(), key=lambda kv: kv[0]):
        configs = {recipe: _config(group[0].trial, recipe, method, seed) for recipe in RECIPES}
        with Store(db) as store:
            done = {recipe: store.trial(config_hash(c)) for recipe, c in configs.items()}
        finished = {recipe: t for recipe, t in done.items() if t is not None and t.status == "finished"}
        if len(finished) == len(RECIPES) and _cooked_from(finished["uniform"]) == {i.trial.config_hash for i in group}:
            rows += [_row(task, backbone, seed, recipe, t.diagnostics["soup"], t.metrics, "kept")
                     for recipe, t in done.items()]
            continue
        if finished:  # the sweep gained (or lost) trials since these soups were cooked: cook them again
            log.info("%s / %s seed %d: the soups' ingredients changed; cooking them again", task, backbone, seed)
            with Store(db) as store:
                for t in finished.values():
                    store.reopen(t.config_hash)
        start, cpu_start = time.perf_counter(), time.process_time()
        soups = cook(group, device)
        timings = {"fit_seconds": round(time.perf_counter() - start, 3),
                   "cpu_seconds": round(time.process_time() - cpu_start, 3)}  # both recipes: one cooking
        with Store(db) as store:
            rows += [_row(task, backbone, seed, soup.recipe, _store(store, sweep, configs[soup.recipe], soup, timings,
                                                                    device), soup.metrics, "cooked") for soup in soups]
    return rows


def _cooked_from(uniform: StoredTrial) -> set[str]:
    """The trials a stored uniform soup was cooked from: all of its candidates (as for the greedy one)."""
    return {i["trial"] for i in uniform.diagnostics["soup"]["ingredients"]}


def _config(trial: StoredTrial, recipe: str, method: str, seed: int) -> dict[str, Any]:
    """A soup's trial config: its method's task and backbone, ``<recipe>-soup`` as the method."""
    return {**{k: trial.config[k] for k in ("task", "task_options", "backbone", "backbone_options")},
            "method": soup_method(recipe), "hyperparameters": {"of": method, "seed": seed}}


def _store(store: Store, sweep: str, config: dict[str, Any], soup: Soup, timings: dict[str, float],
           device: torch.device) -> dict:
    """Write ``soup`` as a finished trial of ``sweep``; returns what it records of its ingredients."""
    key = config_hash(config)
    details = {"recipe": soup.recipe, "of": config["hyperparameters"]["of"], "tried": soup.tried,
               "ingredients": [{"trial": i.trial.config_hash, "id_val": i.id_val,
                                "hyperparameters": i.trial.config["hyperparameters"]} for i in soup.ingredients]}
    store.register(sweep, key, config)
    if store.claim(key):
        with store.lease(key):
            store.mark_finished(key, task_name=soup.ingredients[0].trial.task,
                                selected={"ingredients": len(soup.ingredients)}, metrics=soup.metrics,
                                history=[],  # no epochs: selection reads the soup's final metrics, as for LP
                                timings=timings, environment=environment(device),
                                diagnostics={"soup": details, **({} if soup.weight_change is None
                                                                  else {"weight_change": soup.weight_change})})
    log.info("%s of %d %s trials: %d ingredients, id_val %.4f", soup_method(soup.recipe), soup.tried,
             details["of"], len(soup.ingredients), soup.metrics[ID_VAL]["accuracy"])
    return details


def _row(task: str, backbone: str, seed: int, recipe: str, details: dict, metrics: dict, state: str) -> dict:
    return {"task": task, "backbone": backbone, "seed": seed, "soup": soup_method(recipe), "of": details["of"],
            "ingredients": len(details["ingredients"]), "tried": details["tried"],
            "accuracy": {k: v["accuracy"] for k, v in metrics.items()}, "state": state}
