"""The ``lpft`` command line as a user meets it, run in real subprocesses: errors, output when
piped or on a terminal, progress bars and their switches, tables at 80 columns, option names.

Start-up time is measured by benchmarks/cli_startup.py, not asserted here; what keeps it low
(no torch or registry imported to answer ``--help``) is.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from lpft.cli import COMMANDS, build_parser
from lpft.commands.diagnose import calibration_table, change_table

from conftest import TEXT_TOPICS

LONG_SPLIT = "questions-asked-on-a-forum-about-many-topics"  # a table with a column per split cut it at 80
BAR = "%|"  # tqdm's bar starts after "<desc>: NN%|"
LOG_TIME = re.compile(r"\d\d:\d\d:\d\d ")  # how each log line starts


def lpft(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m lpft.cli ARGS`` with stdout and stderr piped (not terminals), as in CI or ``> log``."""
    return subprocess.run([sys.executable, "-m", "lpft.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=900)


def lpft_on_terminal(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Exit status and stderr of ``python -m lpft.cli ARGS`` whose stderr is an 80x24 (pseudo-)terminal."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # else 0 columns: empty bars
    child = subprocess.Popen([sys.executable, "-m", "lpft.cli", *args], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=follower, env={**os.environ, **env}, cwd=cwd)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return child.wait(timeout=900), b"".join(chunks).decode(errors="replace")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A fresh feature cache, 80 columns, and no TQDM_DISABLE inherited (an empty value does not disable)."""
    return {"LPFT_CACHE": str(tmp_path / "cache"), "COLUMNS": "80", "TQDM_DISABLE": ""}


@pytest.fixture
def long_split_task(tmp_path) -> Path:
    """The text-topics example with its OOD split ``questions`` renamed to :data:`LONG_SPLIT`."""
    folder = tmp_path / "task"
    shutil.copytree(TEXT_TOPICS.parent, folder)
    task = yaml.safe_load((folder / "task.yaml").read_text())
    task["splits"]["ood"] = {"casual": "ood-casual.csv", LONG_SPLIT: "ood-questions.csv"}
    (folder / "task.yaml").write_text(yaml.safe_dump(task))
    return folder / "task.yaml"


# ---------------------------------------------------------------------- errors
def _one_line_error(done: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"lpft {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_missing_task_file_is_one_line_and_status_2(env, tmp_path):
    done = lpft("run", str(tmp_path / "nope.yaml"), "--backbone", "minilm-l6", "--method", "lp", "--device", "cpu",
                env=env)
    _one_line_error(done, "run", "nope.yaml")


def test_a_missing_database_is_one_line_and_status_2(env, tmp_path):
    _one_line_error(lpft("report", str(tmp_path / "missing.sqlite"), env=env), "report", "missing.sqlite")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_and_status_2(env):
    done = lpft("run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "lp", "--device", "cuda", env=env)
    _one_line_error(done, "run", "--device cuda", "no CUDA device")


def test_a_method_flag_the_method_does_not_read_is_one_line_and_status_2(env):
    done = lpft("run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "lp", "--lr", "0.1", env=env)
    _one_line_error(done, "run", "--lr does not apply to --method lp")


def test_task_options_are_typed_and_a_bad_one_is_one_line_and_status_2(env):
    from lpft.commands.common import task_options

    args = build_parser(["advise"]).parse_args(["advise", "emoji-styles", "--backbone", "efficientnet-lite0",
                                                "--task-option", "size=128", "--task-option", "id_style=twemoji"])
    assert task_options(args) == {"size": 128, "id_style": "twemoji"}
    _one_line_error(lpft("advise", "emoji-styles", "--task-option", "size", "--backbone", "efficientnet-lite0",
                         env=env), "advise", "write KEY=VALUE")
    _one_line_error(lpft("run", str(TEXT_TOPICS), "--task-option", "size=64", "--backbone", "minilm-l6", "--method",
                         "lp", env=env), "run", "apply to bundled benchmarks")


def test_verbose_shows_the_traceback(env):
    done = lpft("-v", "run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "lp", "--lr", "0.1", env=env)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ConfigError: --lr does not apply" in done.stderr


@pytest.mark.parametrize(("backbone", "size", "says"), [
    ("minilm-l6", "999", "takes no image_size (--image-size); its options: weights"),
    ("efficientnet-lite0", "0", "image_size (--image-size) must be a whole number of pixels from 8 to 4096; got 0"),
    ("efficientnet-lite0", "10000", "from 8 to 4096; got 10000"),
])
def test_a_bad_image_size_names_the_flag(env, backbone, size, says):
    done = lpft("run", str(TEXT_TOPICS), "--backbone", backbone, "--image-size", size, "--method", "lp",
                "--device", "cpu", env=env)
    _one_line_error(done, "run", says)


# ---------------------------------------------------------------------- piped output and tables
def test_piped_output_has_no_control_codes_and_tables_keep_long_split_names_whole(env, long_split_task):
    done = lpft("run", str(long_split_task), "--backbone", "minilm-l6", "--method", "lp", "--device", "cpu", env=env)
    assert done.returncode == 0, done.stderr
    both = done.stdout + done.stderr
    assert "\x1b" not in both and "\r" not in both  # no colours, cursor moves or bars redrawn in place
    assert BAR not in done.stderr
    assert f"OOD {LONG_SPLIT}" in done.stdout  # whole, on one line: not cut to "OOD questi…"
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    assert "LP chose C=" in done.stdout
    assert "linear probe: C=" in done.stderr and "lpft.methods" not in done.stderr  # log lines without logger names


def test_diagnose_tables_fit_80_columns_and_fold_what_cannot_fit():
    splits = ["id_val", "ood/fluent-emoji-flat", f"ood/{LONG_SPLIT}"]
    change = {"mean_sq_change": 1.2e-3, "relative_change": 0.0567, "cosine_distance": 0.0123, "cka": 0.9877}
    calibration = {"accuracy": 0.853, "ece": 0.123, "ece_ts": 0.045, "nll": 0.456, "nll_ts": 0.401, "brier": 0.234,
                   "brier_ts": 0.221, "temperature": 1.4}
    diagnosis = {"label": "LP-FT lr=0.0003", "feature_change": dict.fromkeys(splits, change),
                 "calibration": dict.fromkeys(splits, calibration)}
    out = io.StringIO()
    console = Console(file=out, width=80)
    console.print(change_table([diagnosis]))
    console.print(calibration_table(diagnosis))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "LP-FT lr=0.0003 │ OOD fluent-emoji-flat" in text and "OOD fluent-emoji-flat │ 85.3" in text
    # the name too long for any column is folded over lines, every character kept
    assert LONG_SPLIT in text.replace("│", "").replace(" ", "").replace("\n", "")


# ---------------------------------------------------------------------- progress bars on a terminal
def test_on_a_terminal_bars_show_and_log_lines_never_land_on_a_bar(env, tmp_path):
    status, stderr = lpft_on_terminal("run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "ft",
                                      "--epochs", "1", "--batch-size", "64", "--device", "cpu", env=env, cwd=tmp_path)
    assert status == 0, stderr
    assert "fine-tune:" in stderr and BAR in stderr
    starts = [m.start() for m in LOG_TIME.finditer(stderr)]
    assert any("epoch 1/1" in stderr[s:s + 40] for s in starts)  # logged while the fine-tune bar was up
    assert all(s == 0 or stderr[s - 1] in "\r\n" for s in starts), stderr  # each log line starts a line


def test_an_error_while_a_bar_is_up_starts_a_line_of_its_own(env, tmp_path):
    status, stderr = lpft_on_terminal("run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "ft",
                                      "--lr", "1e6", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                                      env=env, cwd=tmp_path)
    assert status == 2, stderr
    assert "fine-tune:" in stderr  # the bar was up when training diverged
    at = stderr.index("lpft run: error: training diverged")
    assert stderr[at - 1] in "\r\n" and "Traceback" not in stderr


@pytest.mark.parametrize("switch", ["TQDM_DISABLE=1", "--no-progress"])
def test_one_switch_silences_every_bar(env, tmp_path, switch):
    flags, extra = (["--no-progress"], {}) if switch == "--no-progress" else ([], {"TQDM_DISABLE": "1"})
    status, stderr = lpft_on_terminal(*flags, "run", str(TEXT_TOPICS), "--backbone", "minilm-l6", "--method", "ft",
                                      "--epochs", "1", "--batch-size", "64", "--device", "cpu",
                                      env={**env, **extra}, cwd=tmp_path)
    assert status == 0, stderr
    assert "epoch 1/1" in stderr  # the run logged as usual
    assert BAR not in stderr and "fine-tune" not in stderr, stderr


# ---------------------------------------------------------------------- help, start-up, option names
HEAVY = ("torch", "transformers", "matplotlib", "lpft.runs", "lpft.methods")


@pytest.mark.parametrize("args", [["--help"], ["--version"]]
                         + [[c, "--help"] for c in COMMANDS if c not in ("run", "report")])
def test_help_imports_neither_torch_nor_the_registries(args):
    """``lpft --help`` and ``lpft CMD --help`` (but ``run``, whose flags come from the method registry) stay light."""
    probe = ("import sys\nfrom lpft.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


def test_top_level_help_lists_every_command_with_its_own_help():
    done = lpft("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert f"\n    {name} " in done.stdout
    registered = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions}
    assert registered == {name: summary for name, (_, summary) in COMMANDS.items()}  # the static table is current


def test_run_help_lists_the_method_flags_and_every_help_shows_defaults():
    run = lpft("run", "--help").stdout
    assert "--lr FLOAT" in run and "--C auto|FLOAT" in run and "--out DIR" in run and "--save" not in run
    assert "--device DEVICE" in run and "(default: auto)" in run
    assert "(default: 64)" in lpft("demo", "--help").stdout  # --image-size
    theory = lpft("theory", "--help").stdout
    assert "(default: 3000)" in theory and "--out DIR" in theory and "--out-dir" not in theory


def test_old_option_names_still_work_and_say_what_replaces_them(tmp_path):
    done = lpft("theory", "--out-dir", str(tmp_path), "--no-plot", "--eps", "0.1", "--seeds", "1", "--steps", "10",
                "--d", "6", "--k", "2", "--m", "3", "--n", "6")
    assert done.returncode == 0, done.stderr
    assert "lpft: warning: --out-dir is deprecated; use --out" in done.stderr
    assert (tmp_path / "theory.json").is_file()
