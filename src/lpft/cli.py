"""The ``lpft`` command line: one sub-command per module, each adding its own parser.

Errors that are the input's fault (:class:`lpft.errors.LpftError`) print one line naming the
culprit and the fix and exit with status 2; ``-v`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lpft import __version__
from lpft.errors import EXIT_USAGE, LpftError

# sub-command name -> module exposing ``add_parser(subparsers)``; each parser sets ``func``.
COMMANDS: dict[str, str] = {
    "run": "lpft.commands.run",
    "predict": "lpft.commands.predict",
    "demo": "lpft.commands.demo",
    "example": "lpft.commands.example",
    "data": "lpft.commands.data",
    "theory": "lpft.theory.cli",
    "diagnose": "lpft.commands.diagnose",
    "advise": "lpft.commands.advise",
    "sweep": "lpft.commands.sweep",
    "report": "lpft.commands.report",
    "reproduce": "lpft.commands.reproduce",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpft", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"lpft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except LpftError as error:
        if args.verbose:
            raise
        print(f"lpft {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
