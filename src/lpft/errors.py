"""The errors lpft raises for bad input or a missing resource: one family, one CLI behaviour.

Each message names the culprit (file, row, key, flag) and the fix. The command line prints
an :class:`LpftError` as one line and exits with status 2; other exceptions are bugs and
keep their traceback. Each subclass also derives from the builtin a caller would expect
(``ValueError`` for bad values, ``RuntimeError`` for an unusable resource), so code that
caught those before still does.
"""

from __future__ import annotations

EXIT_USAGE = 2  # the status the CLI exits with on an LpftError, as argparse does for bad flags


class LpftError(Exception):
    """Base of every error that is the input's or the environment's fault, not lpft's."""


class TaskError(LpftError, ValueError):
    """A task definition or its data is invalid; the message says where and how to fix it."""


class BackboneError(LpftError, RuntimeError):
    """A backbone cannot be built, e.g. its weights are missing; the message says how to provide them."""


class ConfigError(LpftError, ValueError):
    """A method's hyperparameter is invalid or does not apply; the message names it and what is allowed."""


class SpecError(LpftError, ValueError):
    """A sweep spec is invalid; the message names the key and what is allowed."""


class SelectionError(LpftError, ValueError):
    """A selection rule cannot be applied to the given trials; the message says what is missing."""


class PackageError(LpftError, RuntimeError):
    """A pinned package could not be fetched, verified or unpacked; the message says how to fix it."""


class StoreError(LpftError, RuntimeError):
    """A results database cannot be opened or used as asked."""


class RunError(LpftError, RuntimeError):
    """A saved run cannot be read or reused, or a run could not go on (e.g. it diverged)."""
