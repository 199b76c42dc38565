"""``lpft example NAME DIR``: write out an example that ships with the package, to run from anywhere."""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path

from lpft.errors import ConfigError


def example_names() -> list[str]:
    """Examples bundled in ``lpft/examples/<name>/``."""
    return sorted(p.name for p in (resources.files("lpft") / "examples").iterdir() if p.is_dir())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("example", help="write out a bundled example task (YAML + CSVs) to a folder")
    p.add_argument("name", nargs="?", help=f"which example: {', '.join(example_names())} (omit to list them)")
    p.add_argument("dir", nargs="?", type=Path, help="folder to write (default: ./<name>); must not exist yet")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.name is None:
        print("\n".join(example_names()))
        return 0
    if args.name not in example_names():
        raise ConfigError(f"unknown example {args.name!r}; choose from {example_names()}")
    out = args.dir or Path(args.name)
    if out.exists():
        raise ConfigError(f"{out} already exists; give a new folder")
    with resources.as_file(resources.files("lpft") / "examples" / args.name) as source:
        shutil.copytree(source, out, ignore=shutil.ignore_patterns("__pycache__"))
    task = out / "task.yaml"
    print(f"wrote {out}/" + (f"; run it with: lpft run {task} --backbone minilm-l6 --method lp" if task.is_file() else ""))
    return 0
