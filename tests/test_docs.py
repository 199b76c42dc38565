"""The documented examples run as written: `lpft example`, the sweep spec in docs/sweeps.md, the task in docs/tasks.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from lpft.cli import main as cli_main
from lpft.data import load_task
from lpft.results.spec import parse_spec
from lpft.results.sweep import expand

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _yaml_block(markdown: Path) -> dict:
    (block,) = re.findall(r"```yaml\n(.*?)```", markdown.read_text(), flags=re.S)
    return yaml.safe_load(block)


def test_lpft_example_writes_a_task_that_loads_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["example", "text-topics", "mine"]) == 0
    task = load_task(tmp_path / "mine" / "task.yaml")
    assert task.name == "text-topics" and len(task.train) == 120 and set(task.ood) == {"casual", "questions"}
    assert cli_main(["example", "text-topics", "mine"]) == 2  # an existing folder is never overwritten


def test_the_sweep_spec_in_the_docs_is_valid_and_has_the_trials_it_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["example", "text-topics", "text-topics"]) == 0
    spec = parse_spec(_yaml_block(DOCS / "sweeps.md"), base_dir=tmp_path)
    assert len(expand(spec)) == 15  # "3 seeds x (1 LP + 2 FT + 2 LP-FT) = 15 trials"
    assert Path(spec.task).is_file()


def test_every_top_level_spec_key_is_documented():
    from lpft.results.spec import SPEC_KEYS

    table = (DOCS / "sweeps.md").read_text()
    for key in SPEC_KEYS:
        assert f"`{key}`" in table, key


def test_the_task_example_in_the_docs_loads(tmp_path):
    text = (DOCS / "tasks.md").read_text()
    (script,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:1]
    assert "task.yaml" in script and shutil.which("bash")
