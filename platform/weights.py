"""The local weights cache: a registry version's files on this machine's disk, downloaded once and verified.

Every package that loads weights by reference (the engine's neural backends, the RefLayer builders, the tiny VAE)
goes through :func:`fetch_weights`. The cache folder is ``<cache_dir>/<kind>/<name>/<version>-<content
sha256[:12]>``; a folder counts as cached only once its marker file (written last, after every file matched its
manifest's sha256) is there and every file still has its manifest size.

The registry (and boto3 with it) is imported where weights are fetched, not at the top, so that modules which
import this one load on a machine without boto3 (the GPU-check scripts).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflade.platform.registry import Registry

__all__ = ["LocalWeights", "default_cache_dir", "fetch_weights"]

MARKER = ".reflade-weights.json"
"""Written last into a cached weights folder, after every file was verified against the manifest."""


def default_cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """Where downloaded weights are kept: ``configured`` when given (e.g. ``engine.weights_cache``), else
    ``$XDG_CACHE_HOME/reflade/weights`` (``~/.cache/reflade/weights``)."""
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "reflade" / "weights"


@dataclass(frozen=True)
class LocalWeights:
    """A weights version on local disk."""

    ref: str
    """Exact reference, ``weights/NAME@N``."""
    path: Path
    """Folder holding the version's files."""
    downloaded: bool
    """False when the cache already held a verified copy."""


def _cached_ok(folder: Path, files: list[dict[str, Any]], content: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("content_sha256") != content:
        return False
    # sha256 was checked when the files came down; sizes catch a truncated or replaced file cheaply.
    for f in files:
        p = folder / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"]:
            return False
    return True


def fetch_weights(registry: Registry, ref: str, cache_dir: str | os.PathLike | None = None) -> LocalWeights:
    """Resolve ``ref`` and make its files available locally, downloading only what the cache lacks.

    The content hash in the folder name keeps two registries (prefixes, buckets) that both hold a ``@1`` apart.
    A download goes to a temporary folder that is renamed into place once every file matched its manifest, so
    concurrent actors on one machine never see a partial folder.

    Args:
        registry: where ``ref`` resolves.
        ref: a registry reference (``weights/sd3-medium@latest``, ``model/reflayer@3``, ...).
        cache_dir: the cache's root; None means :func:`default_cache_dir`.

    Raises:
        RegistryError: malformed or unknown reference.
        IntegrityError: a file in the object store does not match its manifest (nothing is cached).
    """
    from reflade.platform.registry import content_hash

    version = registry.resolve(ref)
    content = content_hash(version.files)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / version.kind / version.name / f"{version.version}-{content[:12]}"
    if _cached_ok(folder, version.files, content):
        return LocalWeights(version.ref, folder, False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        registry.download(version.ref, tmp, progress=False)
        (tmp / MARKER).write_text(
            json.dumps({"ref": version.ref, "content_sha256": content, "files": version.files}, indent=1)
        )
        if folder.exists():  # a stale or damaged copy (a racing writer's complete copy passes the check)
            if _cached_ok(folder, version.files, content):
                return LocalWeights(version.ref, folder, False)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _cached_ok(folder, version.files, content):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LocalWeights(version.ref, folder, True)
