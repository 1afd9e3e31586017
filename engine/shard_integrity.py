"""A registered dataset version's shards checked against its manifest (size and sha256), once per object and process.

The readers in ``schema.py`` (``load_rows``, ``read_dataset``) call these before they parse a shard, so a shard
changed or truncated in the object store is refused with an error that names it rather than read.
"""

from __future__ import annotations

import hashlib
from typing import Any

from reflade.engine.schema import shard_files

VERIFIED: set[tuple[str, str, str]] = set()
"""Shards this process has hashed and found as their manifest says: (bucket path, manifest sha256, the object's
ETag). A version's files never change, so each is hashed once per process; an object rewritten in place gets a new
ETag and is hashed again."""


def _corrupt(version, entry: dict[str, Any], found: str):
    from reflade.platform.registry import IntegrityError

    return IntegrityError(
        f"{version.ref}: shard {entry['path']!r} is corrupt in the object store ({found}; the manifest says "
        f"sha256 {str(entry['sha256'])[:12]}..., {entry['size']} bytes)"
    )


def shard_bytes(registry, version, entry: dict[str, Any]) -> bytes:
    """One shard's bytes, hashed against the manifest unless this process has verified that object already."""
    key = version.key(entry["path"])
    data, etag = registry.storage.get_bytes(key)
    mark = (registry.storage.path(key), str(entry["sha256"]), etag)
    if mark not in VERIFIED:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"] or len(data) != entry["size"]:
            raise _corrupt(version, entry, f"sha256 {digest[:12]}..., {len(data)} bytes")
        VERIFIED.add(mark)
    return data


def verify_shards(registry, version) -> int:
    """Check every shard of a dataset version against its manifest (size, then sha256 of the whole object),
    streaming each from the object store; objects this process verified before are not read again.

    Returns:
        how many shards were hashed (0 when every one was verified already).

    Raises:
        IntegrityError: a shard is missing, or its size or sha256 differs from the manifest (names the shard).
    """
    from concurrent.futures import ThreadPoolExecutor

    storage = registry.storage
    listed = {o["Key"]: o for o in storage.list(version.key("shards/"))}
    todo = []
    for entry in shard_files(version):
        key = version.key(entry["path"])
        obj = listed.get(key)
        if obj is None:
            raise _corrupt(version, entry, "missing")
        if int(obj["Size"]) != entry["size"]:
            raise _corrupt(version, entry, f"{obj['Size']} bytes")
        mark = (storage.path(key), str(entry["sha256"]), obj["ETag"])
        if mark not in VERIFIED:
            todo.append((entry, key, mark))

    def one(item) -> None:
        entry, key, mark = item
        body, h = storage.open_read(key), hashlib.sha256()
        while chunk := body.read(1 << 20):
            h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise _corrupt(version, entry, f"sha256 {h.hexdigest()[:12]}...")
        VERIFIED.add(mark)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, todo))
    return len(todo)
