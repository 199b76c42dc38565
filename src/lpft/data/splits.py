"""The names of a task's splits, as results, selection rules and reports key them.

``train`` fits, ``id_val`` selects (the only split any selection step may read, unless a
rule is labelled oracle), ``id_test`` reports ID accuracy, and each OOD test split is keyed
``ood/<name>``.
"""

from __future__ import annotations

TRAIN = "train"
ID_VAL = "id_val"
ID_TEST = "id_test"
OOD_PREFIX = "ood/"
SELECTION_SPLIT = ID_VAL


def ood_key(name: str) -> str:
    """``sketch`` -> ``ood/sketch``."""
    return OOD_PREFIX + name


def is_ood(key: str) -> bool:
    return key.startswith(OOD_PREFIX)


def ood_name(key: str) -> str:
    """``ood/sketch`` -> ``sketch``."""
    return key.removeprefix(OOD_PREFIX)


def display_name(key: str) -> str:
    """How tables head a split: ``ID val``, ``ID``, ``OOD sketch``."""
    return {ID_VAL: "ID val", ID_TEST: "ID"}.get(key, "OOD " + ood_name(key) if is_ood(key) else key)
