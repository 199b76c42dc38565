"""Bundled benchmarks by name, and one entry point that accepts a name or a YAML path."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from lpft.data.task import Task, TaskError
from lpft.registry import Registry, load_plugins

BenchmarkLoader = Callable[..., Task]
_BENCHMARKS: Registry[BenchmarkLoader] = Registry("benchmark")


def register_benchmark(name: str) -> Callable[[BenchmarkLoader], BenchmarkLoader]:
    """Register ``fn(**options) -> Task`` under ``name``; the loader prepares and caches its data."""

    return _BENCHMARKS.register(name)


def benchmark_names() -> list[str]:
    _import_builtin()
    return _BENCHMARKS.names()


def load_task(spec: str | Path, **options) -> Task:
    """A bundled benchmark by name, or a task YAML file by path."""
    _import_builtin()
    if str(spec) in _BENCHMARKS:
        loader = _BENCHMARKS[str(spec)]
        known = inspect.signature(loader).parameters
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TaskError(f"benchmark {str(spec)!r} has no option {', '.join(unknown)}; its options: "
                            f"{', '.join(known) or 'none'}")
        return loader(**options)
    path = Path(spec)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        from lpft.data.files import load_task_yaml

        if options:  # a YAML task says everything in its file: an option here would be silently ignored
            raise TaskError(f"task options ({', '.join(sorted(options))}) apply to bundled benchmarks, not to "
                            f"the task file {path}; set them in the file")
        return load_task_yaml(path)
    raise TaskError(f"unknown task {str(spec)!r}: not a bundled benchmark {_BENCHMARKS.names()} nor a YAML file")


def _import_builtin() -> None:
    import lpft.data.bundled  # noqa: F401  (registers the bundled benchmarks)

    load_plugins("lpft.benchmarks")
