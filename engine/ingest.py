"""Engine input: a local folder, an ``s3://`` prefix, a manifest, or a registry reference -> a list of raw
objects in the bucket, each with its sha256.

A local folder is uploaded once to a content-addressed prefix (``raw/sha256/<2>/<sha256>``): a second run
uploads nothing. Every file is input, whatever its name: the pre-filter decides what is a usable photo.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reflade.platform.errors import ReportedError
from reflade.platform.progress import show_progress
from reflade.platform.registry import Ref, Registry, RegistryError
from reflade.platform.storage import Storage, parse_uri

RAW_PREFIX = "raw/sha256/"
SHA256_RE = re.compile(r"[0-9a-f]{64}")


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


@dataclass(frozen=True)
class RejectedRecord:
    """A manifest record the engine will not read (a malformed ``sha256`` or ``size``): quarantined at commit."""

    name: str
    """The record's ``name``, ``key`` or ``uri``, for people."""
    reason_code: str
    reason: str

    def quarantine_row(self) -> dict[str, Any]:
        """The row of the dataset's ``quarantine.parquet`` (its schema: ``reflade.engine.schema``)."""
        return {
            "source_id": None,
            "source_sha256": None,
            "name": self.name,
            "stage": "ingest",
            "reason_code": self.reason_code,
            "reason": self.reason,
            "entity_id": None,
            "kind": None,
            "sample_id": None,
        }


@dataclass
class IngestResult:
    items: list[InputItem]
    uploaded: int
    already_there: int
    description: str
    parents: list[str]
    rejected: list[RejectedRecord] = field(default_factory=list)
    """Manifest records quarantined before any read: they count as images in, and as images quarantined."""

    def manifest(self) -> dict[str, Any]:
        return {"description": self.description, "items": [asdict(i) for i in self.items]}

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(sorted(i.sha256 for i in self.items)).encode()).hexdigest()


def raw_key(sha256: str) -> str:
    return f"{RAW_PREFIX}{sha256[:2]}/{sha256}"


def _item(sha: str, key: str, name: str, size: int) -> InputItem:
    return InputItem(sha[:16], sha, key, name, size)


def _quoted(value: Any, limit: int = 80) -> str:
    r = repr(value)  # a value from an untrusted manifest: quoted and cut, never echoed raw
    return r if len(r) <= limit else r[:limit] + "..."


def _bad_sha256(value: Any) -> str | None:
    """Why a manifest's ``sha256`` value is unusable, or None (64 hex digits; upper case is accepted)."""
    if isinstance(value, str) and SHA256_RE.fullmatch(value.lower()):
        return None
    return f"bad_sha256: {_quoted(value)} is not 64 hex digits"


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
    """A JSON list, JSON Lines or Parquet file of records with ``key`` (or ``uri``), optional ``sha256``,
    ``size`` and ``name``.

    A record whose ``sha256`` is not 64 hex digits or whose ``size`` is not a byte count is never read: it goes to
    ``IngestResult.rejected`` with its reason, and the engine quarantines it at commit.

    Raises:
        IngestError: the file cannot be read or parsed, or a record is not a record or has no key.
    """
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
    else:
        try:
            if path.endswith(".jsonl"):
                records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            else:
                loaded = json.loads(data)
                records = loaded.get("items", loaded) if isinstance(loaded, dict) else loaded
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IngestError(f"manifest {path} is not valid JSON: {e}") from None
    if not isinstance(records, list) or not records:
        raise IngestError(f"manifest {path}: expected a non-empty list of records with 'key' or 'uri'")
    if limit is not None:
        records = records[:limit]
    items, rejected = [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise IngestError(f"manifest {path}: record {i} is a {type(rec).__name__}, not a record")
        key = rec.get("key") or (storage.key_of(rec["uri"]) if rec.get("uri") else None)
        if not key:
            raise IngestError(f"manifest {path}: record {i} has neither 'key' nor 'uri'")
        name = str(rec.get("name") or key)
        sha = rec.get("sha256")
        size = rec.get("size")
        if size is not None and (type(size) is not int or size < 0):
            why = f"bad_size: {_quoted(size)} is not a byte count"
            rejected.append(RejectedRecord(name, "bad_size", f"{why} (manifest record {i})"))
            continue
        if sha is None or sha == "":
            body = storage.open_read(key)
            h = hashlib.sha256()
            size = 0
            while chunk := body.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
            sha = h.hexdigest()
        elif why := _bad_sha256(sha):
            # The record lies about its content or is broken: quarantined with the reason, never read.
            rejected.append(RejectedRecord(name, "bad_sha256", f"{why} (manifest record {i})"))
            continue
        items.append(_item(sha.lower(), key, name, int(size or 0)))
    return IngestResult(items, 0, len(items), f"manifest {path}", [], rejected)


def ingest_registry(ref: str, registry: Registry, limit: int | None = None) -> IngestResult:
    v = registry.resolve(ref)
    files = v.files[:limit] if limit is not None else v.files
    items, rejected = [], []
    for f in files:
        # A damaged registry manifest: the same rule as a manifest file.
        if why := _bad_sha256(f.get("sha256")):
            rejected.append(RejectedRecord(str(f.get("path")), "bad_sha256", f"{why} ({v.ref})"))
            continue
        items.append(_item(f["sha256"].lower(), v.key(f["path"]), f["path"], f["size"]))
    return IngestResult(items, 0, len(items), f"registry {v.ref}", [v.ref], rejected)


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
