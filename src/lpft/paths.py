"""Where lpft keeps prepared data and cached features."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LPFT_CACHE`` if set, else ``~/.cache/lpft``; created on first use."""
    root = Path(os.environ.get("LPFT_CACHE") or Path.home() / ".cache" / "lpft")
    root.mkdir(parents=True, exist_ok=True)
    return root
