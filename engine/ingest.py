"""Engine input: a local folder, an ``s3://`` prefix, a manifest, or a registry reference -> a list of raw
objects in the bucket, each with its sha256.

A local folder is uploaded once to a content-addressed prefix (``raw/sha256/<2>/<sha256>``): a second run
uploads nothing. Every file is input, whatever its name: the pre-filter decides what is a usable photo.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reflade.platform.errors import ReportedError
from reflade.platform.progress import show_progress
from reflade.platform.registry import Ref, Registry, RegistryError
from reflade.platform.storage import Storage, parse_uri

RAW_PREFIX = "raw/sha256/"


class IngestError(ReportedError, ValueError):
    """The input cannot be read (missing folder, foreign bucket, malformed manifest)."""


@dataclass(frozen=True)
class InputItem:
    """One raw input object."""

    source_id: str
    """First 16 hex digits of the content's sha256 (identical files are one source)."""
    sha256: str
    key: str
    """Key of the raw bytes in the bucket."""
    name: str
    """Where it came from (file name, key), for people."""
    size: int


@dataclass
class IngestResult:
    items: list[InputItem]
    uploaded: int
    already_there: int
    description: str
    parents: list[str]

    def manifest(self) -> dict[str, Any]:
        return {"description": self.description, "items": [asdict(i) for i in self.items]}

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(sorted(i.sha256 for i in self.items)).encode()).hexdigest()


def raw_key(sha256: str) -> str:
    return f"{RAW_PREFIX}{sha256[:2]}/{sha256}"


def _item(sha: str, key: str, name: str, size: int) -> InputItem:
    return InputItem(sha[:16], sha, key, name, size)


def _sha_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def ingest_folder(
    folder: Path, storage: Storage, limit: int | None = None, progress: bool | None = None
) -> IngestResult:
    from tqdm.auto import tqdm

    if not folder.is_dir():
        raise IngestError(f"input folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    if limit is not None:
        files = files[:limit]
    if not files:
        raise IngestError(f"input folder {folder} holds no files")
    uploaded = there = 0
    items = []

    def one(p: Path) -> tuple[InputItem, bool]:
        sha, size = _sha_file(p)
        key = raw_key(sha)
        if storage.exists(key):
            return _item(sha, key, p.relative_to(folder).as_posix(), size), False
        storage.upload_file(p, key, progress=False)
        return _item(sha, key, p.relative_to(folder).as_posix(), size), True

    with ThreadPoolExecutor(max_workers=4) as pool:
        bar = tqdm(
            total=len(files), desc="ingest", unit="file", disable=not show_progress(progress), leave=False
        )
        for item, new in pool.map(one, files):
            items.append(item)
            uploaded += new
            there += not new
            bar.update(1)
        bar.close()
    return IngestResult(items, uploaded, there, f"folder {folder.resolve()}", [])


def ingest_prefix(uri: str, storage: Storage, limit: int | None = None) -> IngestResult:
    bucket, prefix = parse_uri(uri)
    if bucket != storage.bucket:
        raise IngestError(f"{uri}: input must be in the configured bucket {storage.bucket!r}")
    objs = [o for o in storage.list(prefix) if not o["Key"].endswith("/")]
    if limit is not None:
        objs = objs[:limit]
    if not objs:
        raise IngestError(f"no objects under {uri}")

    def one(o) -> InputItem:
        body = storage.open_read(o["Key"])
        h = hashlib.sha256()
        while chunk := body.read(1 << 20):
            h.update(chunk)
        return _item(h.hexdigest(), o["Key"], o["Key"], int(o["Size"]))

    with ThreadPoolExecutor(max_workers=4) as pool:
        items = list(pool.map(one, objs))
    return IngestResult(items, 0, len(items), f"prefix {uri}", [])


def ingest_manifest(path: str, storage: Storage, limit: int | None = None) -> IngestResult:
    """A JSON list, JSON Lines or Parquet file of records with ``key`` (or ``uri``), optional ``sha256``
    and ``name``."""
    if path.startswith("s3://"):
        data, _ = storage.get_bytes(storage.key_of(path))
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise IngestError(f"cannot read manifest {path}: {e.strerror}") from None
    if path.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        records = pq.read_table(io.BytesIO(data)).to_pylist()
    elif path.endswith(".jsonl"):
        records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    else:
        loaded = json.loads(data)
        records = loaded.get("items", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(records, list) or not records:
        raise IngestError(f"manifest {path}: expected a non-empty list of records with 'key' or 'uri'")
    if limit is not None:
        records = records[:limit]
    items = []
    for i, rec in enumerate(records):
        key = rec.get("key") or (storage.key_of(rec["uri"]) if rec.get("uri") else None)
        if not key:
            raise IngestError(f"manifest {path}: record {i} has neither 'key' nor 'uri'")
        sha = rec.get("sha256")
        size = rec.get("size")
        if not sha:
            body = storage.open_read(key)
            h = hashlib.sha256()
            size = 0
            while chunk := body.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
            sha = h.hexdigest()
        items.append(_item(sha, key, rec.get("name") or key, int(size or 0)))
    return IngestResult(items, 0, len(items), f"manifest {path}", [])


def ingest_registry(ref: str, registry: Registry, limit: int | None = None) -> IngestResult:
    v = registry.resolve(ref)
    files = v.files[:limit] if limit is not None else v.files
    items = [_item(f["sha256"], v.key(f["path"]), f["path"], f["size"]) for f in files]
    return IngestResult(items, 0, len(items), f"registry {v.ref}", [v.ref])


def ingest(
    source: str, storage: Storage, registry: Registry, limit: int | None = None, progress: bool | None = None
) -> IngestResult:
    """Resolve SOURCE (folder, s3:// prefix, manifest file, or registry reference) to raw objects."""
    if source.startswith("s3://"):
        if source.endswith((".json", ".jsonl", ".parquet")):
            return ingest_manifest(source, storage, limit)
        return ingest_prefix(source, storage, limit)
    p = Path(source).expanduser()
    if p.is_dir():
        return ingest_folder(p, storage, limit, progress)
    if p.is_file():
        return ingest_manifest(str(p), storage, limit)
    try:
        Ref.parse(source)
    except RegistryError:
        raise IngestError(
            f"input {source!r} is not a folder, a manifest file, an s3:// URI or a registry reference"
        ) from None
    return ingest_registry(source, registry, limit)
