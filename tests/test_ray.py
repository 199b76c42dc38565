"""Sweep trials dispatched as Ray tasks on a local Ray instance write the same store the serial loop does."""

from __future__ import annotations

import pytest

from lpft.results.store import Store
from lpft.results.spec import parse_spec
from lpft.results.sweep import run_sweep

from conftest import TEXT_TOPICS

ray = pytest.importorskip("ray")


@pytest.fixture
def local_ray(cache):
    # started after the cache fixture set LPFT_CACHE, so the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_sweep_writes_every_trial_and_resumes(tmp_path, local_ray):
    from lpft.results.ray import run_sweep_ray

    spec = parse_spec({"name": "ray-lp", "task": str(TEXT_TOPICS), "backbone": "minilm-l6", "seeds": [0],
                       "device": "cpu", "methods": {"lp": {"C": [0.1, 1.0]}}})
    db, kept = tmp_path / "results.sqlite", tmp_path / "kept"
    summary = run_sweep_ray(spec, db, progress=False, keep_runs=kept)
    assert (summary.total, summary.skipped, summary.finished, summary.failed) == (2, 0, 2, 0)
    with Store(db) as store:
        rows = store.trials()
        assert {r.config["hyperparameters"]["C"] for r in rows} == {0.1, 1.0}
        assert all(r.environment["device"] == "cpu" and "id_test" in r.metrics for r in rows)
        ray_metrics = {r.config_hash: r.metrics for r in rows}
    # each worker saved its finished run where the driver said (what soups are made from)
    assert {p.name for p in kept.iterdir() if (p / "run.json").is_file()} == set(ray_metrics)

    # resume: the store says both are finished, so neither engine runs anything again
    assert run_sweep_ray(spec, db, progress=False).skipped == 2
    assert run_sweep(spec, db, progress=False).skipped == 2
    with Store(db) as store:
        assert {r.config_hash: r.metrics for r in store.trials()} == ray_metrics


def test_sweep_command_offers_the_ray_engine():
    from lpft.cli import build_parser

    args = build_parser().parse_args(["sweep", "spec.yaml", "--engine", "ray", "--ray-address", "auto"])
    assert (args.engine, args.ray_address) == ("ray", "auto")
