"""One switch silences every progress bar: ``lpft --no-progress`` sets TQDM_DISABLE, and every bar in lpft reads it."""

from __future__ import annotations

import ast
from pathlib import Path

from lpft.theory.simulate import TheorySettings, simulate

SRC = Path(__file__).resolve().parents[1] / "src" / "lpft"


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def test_every_bar_in_lpft_asks_progress_disabled():
    """A bar given ``disable=None`` or ``not progress`` ignores TQDM_DISABLE (tqdm reads it only for omitted args)."""
    deaf = []
    for path in sorted(SRC.rglob("*.py")):
        for call in _calls(ast.parse(path.read_text()), "tqdm"):
            disable = next((k.value for k in call.keywords if k.arg == "disable"), None)
            if not (isinstance(disable, ast.Call) and getattr(disable.func, "id", None) == "progress_disabled"):
                deaf.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert not deaf, f"tqdm bars that ignore --no-progress: {deaf}"


def test_theory_simulation_draws_no_bar_under_tqdm_disable(monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    simulate(TheorySettings(eps=(0.1,), seeds=1, steps=200), progress=True)
    assert capsys.readouterr().err == ""
