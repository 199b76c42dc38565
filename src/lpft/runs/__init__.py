"""Runs: one pipeline from a run spec to a record, and saved runs that can be diagnosed and reused."""

from lpft.runs.pipeline import RunSpec, execute, resolve_device, run, run_method
from lpft.runs.record import RunRecord, backbone_label, environment

__all__ = ["RunRecord", "RunSpec", "backbone_label", "environment", "execute", "resolve_device", "run", "run_method"]
