"""How lpft's progress bars decide whether to draw, in a module light enough for every bar to import.

The theory simulation and the bundled datasets draw bars without torch; importing
:mod:`lpft.features` for this one rule would load it.
"""

from __future__ import annotations

import os


def progress_disabled(wanted: bool = True) -> bool | None:
    """tqdm's ``disable=`` for lpft's bars: ``True`` when the caller wants none or ``TQDM_DISABLE`` is set
    (``lpft --no-progress`` sets it), else ``None``: tqdm draws the bar only on a terminal.

    Passing ``disable`` at all overrides tqdm's own reading of ``TQDM_DISABLE``, hence the check here.
    """
    return True if not wanted or os.environ.get("TQDM_DISABLE") else None
