"""Feature-distortion diagnostics of saved runs: measured here, drawn in :mod:`lpft.diagnostics.plot`."""

from lpft.diagnostics.measure import (
    block_name, diagnose_run, feature_distortion, ood_id_ratio, run_label, weight_change,
)
from lpft.diagnostics.plot import plot_diagnoses

__all__ = ["block_name", "diagnose_run", "feature_distortion", "ood_id_ratio", "plot_diagnoses", "run_label",
           "weight_change"]
