"""The ``lpft`` command line: one sub-command per module, each adding its own parser.

Only the invoked sub-command's module is imported, and the modules import torch, the
registries and rich inside the functions that run the command, so ``lpft --help``,
``--version`` and most ``lpft CMD --help`` answer without loading them; the top-level help
lists the commands from :data:`COMMANDS`.

Errors that are the input's fault (:class:`lpft.errors.LpftError`) print one line naming the
culprit and the fix and exit with status 2; ``-v`` shows the traceback too. Log lines go
through ``tqdm.write`` so none lands on a progress bar; bars are drawn only on a terminal,
and ``--no-progress`` or ``TQDM_DISABLE=1`` turns every one of them off.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import lpft
from lpft.commands.common import HelpFormatter
from lpft.errors import EXIT_USAGE, LpftError

# sub-command -> (module exposing ``add_parser(subparsers)``, which sets ``func``; its one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("lpft.commands.run", "run one method on a task and report ID and OOD accuracy"),
    "predict": ("lpft.commands.predict", "predict classes for new inputs with a saved run"),
    "demo": ("lpft.commands.demo", "LP vs FT vs LP-FT on emoji-styles (ID: noto; OOD: three other vendors)"),
    "example": ("lpft.commands.example", "write out a bundled example task (YAML + CSVs) to a folder"),
    "data": ("lpft.commands.data", "list or prepare the bundled benchmarks; check every image of a task"),
    "theory": ("lpft.theory.cli", "simulate LP, FT and LP-FT on two-layer linear networks (the paper's theory)"),
    "diagnose": ("lpft.commands.diagnose",
                 "feature change, weight change, first-step gradients and calibration of saved runs"),
    "advise": ("lpft.commands.advise", "predict, before training, whether LP-FT will beat FT out of distribution"),
    "sweep": ("lpft.commands.sweep", "run a sweep spec (YAML); re-running resumes, skipping finished trials"),
    "report": ("lpft.commands.report", "tables and plots from a sweep's results database"),
    "soup": ("lpft.commands.soup", "average the tuned weights of a sweep's runs: uniform and greedy model soups"),
    "reproduce": ("lpft.commands.reproduce", "the paper's LP / FT / LP-FT protocol on every bundled benchmark"),
}
DATE_FORMAT = "%H:%M:%S"


class Parser(argparse.ArgumentParser):
    """An argument parser whose help shows every default (:class:`~lpft.commands.common.HelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``lpft`` parser with the full parsers of ``commands`` (default: all); the others are only listed."""
    full = set(COMMANDS if commands is None else commands)
    parser = Parser(prog="lpft", description=lpft.__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show tracebacks of errors")
    parser.add_argument("--no-progress", action="store_true",
                        help="draw no progress bars (as TQDM_DISABLE=1 does; bars are never drawn when stderr "
                             "is not a terminal)")
    parser.add_argument("--version", action="version", version=f"lpft {lpft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (module, summary) in COMMANDS.items():
        if name in full:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def invoked_command(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names: its first word that is not an option (top-level options take no value)."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = invoked_command(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    configure_logging(args.verbose)
    try:
        with progress_and_logging(show_bars=not args.no_progress):
            return int(args.func(args) or 0)
    except LpftError as error:
        if args.verbose:
            raise
        print(f"lpft {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


class LogFormatter(logging.Formatter):
    """``12:00:01 message``; warnings and errors name their level; with ``-v`` every line names level and logger."""

    def __init__(self, verbose: bool) -> None:
        detailed = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(detailed if verbose else "%(asctime)s %(message)s", DATE_FORMAT)
        self.loud = logging.Formatter(detailed if verbose else "%(asctime)s %(levelname)s: %(message)s", DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self.loud.format(record) if record.levelno >= logging.WARNING else super().format(record)


def configure_logging(verbose: bool) -> None:
    """lpft's own INFO lines (DEBUG with ``-v``) on stderr; other libraries' from WARNING (INFO with ``-v``).

    Python warnings become log lines too, so that they also go above the progress bars.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(verbose))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    logging.getLogger("lpft").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


@contextlib.contextmanager
def progress_and_logging(show_bars: bool) -> Iterator[None]:
    """Run a command with log lines written through ``tqdm.write`` (above the bars, never on them).

    Without ``show_bars`` the command runs with ``TQDM_DISABLE=1``, which lpft's bars (see
    :func:`lpft.progress.progress_disabled`) and child processes read. Bars that an error left
    open are closed on the way out, so that the error message starts a line of its own.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    saved = os.environ.get("TQDM_DISABLE")
    if not show_bars:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        for bar in list(tqdm._instances):  # the bars still open: their loop ended in an exception
            bar.close()
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


if __name__ == "__main__":
    sys.exit(main())
