"""The regime test: its span measure on constructed data, and `lpft advise` end to end on the text example."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lpft.cli import main as cli_main
from lpft.diagnostics.regime import GOOD_FEATURES, out_of_span_energy

from conftest import TEXT_TOPICS


def test_out_of_span_energy_sees_directions_training_never_spanned():
    rng = np.random.default_rng(0)
    train = np.zeros((200, 10))
    train[:, :3] = rng.normal(size=(200, 3))  # training features live in the first 3 coordinates
    inside = np.zeros((50, 10))
    inside[:, :3] = rng.normal(size=(50, 3))
    outside = np.zeros((50, 10))
    outside[:, 5:] = rng.normal(size=(50, 5))
    assert out_of_span_energy(train, inside) == pytest.approx(0.0, abs=1e-9)
    assert out_of_span_energy(train, outside) == pytest.approx(1.0, abs=0.01)  # only the training mean is inside
    assert 0.3 < out_of_span_energy(train, inside + outside) < 0.9


def test_advise_on_the_text_example(cache, tmp_path, capsys):
    out = tmp_path / "advice.json"
    assert cli_main(["advise", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["normalised_accuracy"] >= GOOD_FEATURES and report["verdict"] == "lpft"
    assert set(report["out_of_span"]) == {"id_test", "ood/casual", "ood/questions"}
    assert 0 < report["gradient_ratio"] < 1  # on strong features the probe's head shields the backbone
    assert "LP-FT is expected to beat FT" in capsys.readouterr().out
