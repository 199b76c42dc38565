"""Tasks: the contract, YAML/CSV loading, and the bundled offline benchmarks."""

from lpft.data.registry import benchmark_names, load_task, register_benchmark
from lpft.data.task import Split, Task, TaskError

__all__ = ["Split", "Task", "TaskError", "benchmark_names", "load_task", "register_benchmark"]
