"""Selection rules on hand-made trial records: epochs within a trial, settings across seeds."""

from __future__ import annotations

import dataclasses

import pytest

from lpft.results.selection import (
    IDValidation, LastEpoch, OODOracle, SelectionError, create_rule,
)
from lpft.runs import RunRecord


def ft_trial(lr: float, seed: int, epochs: list[tuple[float, float, float]], method: str = "ft") -> RunRecord:
    """A fine-tuning trial whose history has (id_val, id_test, ood/a) accuracy per epoch."""
    history = [{"epoch": e, "train_loss": 0.0, "accuracy": {"id_val": v, "id_test": t, "ood/a": o}}
               for e, (v, t, o) in enumerate(epochs, 1)]
    best = max(range(len(epochs)), key=lambda i: (epochs[i][0], -i))  # the loop's own id_val choice
    v, t, o = epochs[best]
    metrics = {"id_val": {"accuracy": v}, "id_test": {"accuracy": t}, "ood/a": {"accuracy": o}}
    return RunRecord("task", "bb", method, {"lr": lr, "epochs": len(epochs), "seed": seed}, {"epoch": best + 1}, metrics,
                     history)


# lr 1e-3: high id_val at epoch 2, best OOD at epoch 1; lr 1e-2: higher OOD everywhere, lower id_val.
TRIALS = [
    ft_trial(1e-3, 0, [(0.70, 0.69, 0.50), (0.80, 0.79, 0.40), (0.75, 0.74, 0.45)]),
    ft_trial(1e-3, 1, [(0.72, 0.70, 0.52), (0.82, 0.80, 0.42), (0.78, 0.76, 0.44)]),
    ft_trial(1e-2, 0, [(0.60, 0.61, 0.60), (0.65, 0.64, 0.55), (0.70, 0.69, 0.58)]),
    ft_trial(1e-2, 1, [(0.62, 0.60, 0.62), (0.66, 0.65, 0.56), (0.71, 0.70, 0.57)]),
]


def test_id_validation_picks_best_id_val_epoch_and_lr():
    (sel,) = IDValidation().select(TRIALS)
    assert sel.hyperparameters == {"lr": 1e-3, "epochs": 3}
    assert [c.epoch for c in sel.choices] == [2, 2]
    assert sel.accuracies("id_test") == [0.79, 0.80]
    assert sel.accuracies("ood/a") == [0.40, 0.42]
    assert sel.candidates == {TRIALS[0].setting: pytest.approx(0.81), TRIALS[2].setting: pytest.approx(0.705)}
    assert not sel.oracle and "oracle" not in sel.label


def test_oracle_selects_on_ood_and_says_so():
    (sel,) = OODOracle("ood/a").select(TRIALS)
    assert sel.hyperparameters["lr"] == 1e-2
    assert [c.epoch for c in sel.choices] == [1, 1]
    assert sel.accuracies("ood/a") == [0.60, 0.62]
    assert sel.oracle and "oracle" in sel.label and "ood/a" in sel.label
    # no split: the mean over OOD splits (here the only one), same pick
    assert OODOracle().select(TRIALS)[0].hyperparameters["lr"] == 1e-2
    with pytest.raises(SelectionError, match="OOD split"):
        OODOracle("id_test")


def test_last_epoch_takes_final_epoch_and_ranks_by_id_val_there():
    (sel,) = LastEpoch().select(TRIALS)
    # at the last epoch lr 1e-3 has mean id_val 0.765 > 0.705 of lr 1e-2
    assert sel.hyperparameters["lr"] == 1e-3
    assert [c.epoch for c in sel.choices] == [3, 3]
    assert sel.accuracies("id_test") == [0.74, 0.76]


def test_ties_keep_the_earlier_epoch_and_the_first_setting():
    flat = [ft_trial(lr, 0, [(0.5, 0.1 * i, 0.2), (0.5, 0.9, 0.9)]) for i, lr in enumerate((3e-4, 1e-4), 1)]
    (sel,) = IDValidation().select(flat)
    assert sel.hyperparameters["lr"] == 3e-4 and sel.choices[0].epoch == 1


def test_methods_are_selected_separately_and_lp_has_one_epoch():
    lp = RunRecord("task", "bb", "lp", {"C": "auto", "seed": 0}, {"C": 0.1},
                   {"id_val": {"accuracy": 0.6}, "id_test": {"accuracy": 0.58}, "ood/a": {"accuracy": 0.55}},
                   history=[{"C": 0.1, "val_acc": 0.6}])
    sels = {s.method: s for s in IDValidation().select([*TRIALS, lp])}
    assert set(sels) == {"ft", "lp"}
    assert sels["lp"].choices[0].epoch is None and sels["lp"].accuracies("ood/a") == [0.55]
    assert OODOracle().select([lp])[0].accuracies("id_test") == [0.58]


def test_id_val_only_history_is_completed_from_final_metrics_but_oracle_refuses():
    trial = ft_trial(1e-3, 0, [(0.7, 0.6, 0.5), (0.8, 0.7, 0.4)])
    for h in trial.history:
        h["accuracy"] = {"id_val": h["accuracy"]["id_val"]}  # as with eval_all_splits_each_epoch=False
    (sel,) = IDValidation().select([trial])
    assert sel.choices[0].epoch == 2 and sel.accuracies("ood/a") == [0.4]
    with pytest.raises(SelectionError, match="eval_all_splits_each_epoch"):
        OODOracle().select([trial])
    # the last epoch is complete only when it is the one the trial selected
    assert LastEpoch().select([trial])[0].accuracies("ood/a") == [0.4]
    with pytest.raises(SelectionError, match="eval_all_splits_each_epoch"):
        LastEpoch().select([dataclasses.replace(trial, selected={"epoch": 1})])


def test_repeated_seed_in_a_setting_is_an_error():
    with pytest.raises(SelectionError, match="seed repeated"):
        IDValidation().select([TRIALS[0], TRIALS[0]])


def test_create_rule():
    assert isinstance(create_rule("id-val"), IDValidation)
    assert isinstance(create_rule("last-epoch"), LastEpoch)
    rule = create_rule("oracle:ood/a")
    assert isinstance(rule, OODOracle) and rule.split == "ood/a"
    with pytest.raises(SelectionError, match="unknown selection rule"):
        create_rule("best")
