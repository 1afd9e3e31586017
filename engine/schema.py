"""The RLD sample format: one row = one layer of one source image, with all its prompts.

This module owns the Arrow schema, validation, and the readers and writers for plain Python and for Ray Data.
Train, eval and serve read datasets only through it. A reader refuses a ``schema_version`` it does not know, and
reads a registered shard only once it matches the version's manifest (``shard_integrity.py``).

Conventions (design.md, "Data"): every coordinate and mask is in the pixel frame of ``image``; ``layer`` is
an RGBA PNG with straight alpha and RGB = 0 where alpha = 0; ``visible_mask`` is a 1-channel PNG of 0/255.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reflade.platform.errors import ReportedError

SCHEMA_VERSION = 1
ENGINE_VERSION = "0.1.0"
"""Recorded in every row's provenance (real and synthetic rows alike)."""
KINDS = ("foreground", "background")
SPLITS = ("train", "quality", "test")
PROMPT_BASE_TYPES = ("point", "box", "mask", "text")
GRANULARITIES = ("coarse", "fine")
SAMPLE_ID_PATTERN = r"[0-9a-f]{32}"
"""What a ``sample_id`` looks like: 32 lower-case hex digits, as :func:`make_sample_id` makes them. ``validate_row``
refuses anything else, so an id is always a safe file name (``data export`` makes one folder per sample)."""
SAMPLE_ID_RE = re.compile(SAMPLE_ID_PATTERN)

PROMPT_TYPE = pa.struct(
    [
        ("type", pa.string()),
        ("granularity", pa.string()),
        ("points", pa.list_(pa.list_(pa.int32()))),
        ("box", pa.list_(pa.int32())),
        ("mask", pa.binary()),
        ("text", pa.string()),
    ]
)
PROVENANCE_TYPE = pa.struct(
    [
        ("engine_version", pa.string()),
        ("config_hash", pa.string()),
        ("backends", pa.map_(pa.string(), pa.string())),
        ("weights", pa.list_(pa.string())),
    ]
)
SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("sample_id", pa.string()),
        ("source_id", pa.string()),
        ("source_sha256", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("layer", pa.binary()),
        ("visible_mask", pa.binary()),
        ("kind", pa.string()),
        ("category", pa.string()),
        ("prompts", pa.list_(PROMPT_TYPE)),
        ("split", pa.string()),
        ("scores", pa.map_(pa.string(), pa.float64())),
        ("provenance", PROVENANCE_TYPE),
    ],
    metadata={b"reflade.schema_version": str(SCHEMA_VERSION).encode()},
)
COLUMNS = tuple(SCHEMA.names)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_id", pa.string()),
        ("source_sha256", pa.string()),
        ("name", pa.string()),
        ("stage", pa.string()),
        ("reason_code", pa.string()),
        ("reason", pa.string()),
        ("entity_id", pa.int32()),
        ("kind", pa.string()),
        ("sample_id", pa.string()),
    ]
)


class SchemaError(ReportedError, ValueError):
    """A row or a file does not follow the RLD sample format; the message names the column and the sample."""


def make_sample_id(source_sha256: str, entity_id: int | str, kind: str, config_hash: str) -> str:
    """Deterministic id of a layer: the unit of exactly-once."""
    key = f"{source_sha256}|{entity_id}|{kind}|{config_hash}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def build_row(
    *,
    sample_id: str,
    source_id: str,
    source_sha256: str,
    image_png: bytes,
    width: int,
    height: int,
    layer: np.ndarray,
    visible_mask: np.ndarray,
    kind: str,
    category: str,
    prompts: list[dict[str, Any]],
    split: str,
    scores: dict[str, float],
    config_hash: str,
    backends: dict[str, str],
    weights: list[str],
) -> dict[str, Any]:
    """One dataset row (one layer), the only place rows are assembled: the engine's real rows and the synthetic
    ground-truth rows both come from here.

    Args:
        image_png: the source image as stored (``width`` x ``height`` pixels).
        layer: HxWx4 uint8, the complete layer (straight alpha); encoded as PNG here.
        visible_mask: HxW bool, the visible pixels (see the schema's ``visible_mask``); encoded as PNG here.
        config_hash: the engine configuration's fingerprint (recorded in the provenance).
        backends: stage -> backend family, recorded in the provenance.
        weights: exact registry references of the weights used.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "sample_id": sample_id,
        "source_id": source_id,
        "source_sha256": source_sha256,
        "image": image_png,
        "width": width,
        "height": height,
        "layer": encode_png(layer),
        "visible_mask": encode_png(visible_mask),
        "kind": kind,
        "category": category,
        "prompts": prompts,
        "split": split,
        "scores": scores,
        "provenance": {
            "engine_version": ENGINE_VERSION,
            "config_hash": config_hash,
            "backends": backends,
            "weights": weights,
        },
    }


# ---------------------------------------------------------------------------------------------- images
def encode_png(array: np.ndarray) -> bytes:
    """HxW (bool or uint8), HxWx3 or HxWx4 uint8 -> PNG bytes (bool masks become 0/255)."""
    from PIL import Image

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise SchemaError(f"encode_png expects uint8 or bool, got {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, mode: str | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> array (``mode`` "RGB", "RGBA" or "L" to convert)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if mode and im.mode != mode:
            im = im.convert(mode)
        return np.array(im)


def decode_mask(data: bytes) -> np.ndarray:
    """1-channel 0/255 PNG -> HxW bool."""
    return decode_image(data, "L") >= 128


# ---------------------------------------------------------------------------------------------- validation
def quoted(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: how a message shows a value read from untrusted input."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def _sample_label(row: dict[str, Any]) -> str:
    if "sample_id" not in row:
        return "?"  # a prompt checked on its own (decompose.py strips "sample ?: ")
    sid = row["sample_id"]
    if isinstance(sid, str) and SAMPLE_ID_RE.fullmatch(sid):
        return sid
    return quoted(sid)  # a hostile id is quoted and cut, never echoed raw


def _fail(row: dict[str, Any], msg: str) -> SchemaError:
    return SchemaError(f"sample {_sample_label(row)}: {msg}")


def check_sample_id(row: dict[str, Any]) -> str:
    """The row's ``sample_id`` if it matches :data:`SAMPLE_ID_PATTERN`.

    Raises:
        SchemaError: naming the id found (quoted, cut at 80 characters) and the pattern expected.
    """
    sid = row.get("sample_id")
    if not isinstance(sid, str) or not SAMPLE_ID_RE.fullmatch(sid):
        raise _fail(row, f"sample_id must be {SAMPLE_ID_PATTERN} (32 lower-case hex digits)")
    return sid


def validate_prompt(p: dict[str, Any], width: int, height: int, row: dict[str, Any] | None = None) -> None:
    row = row or {}
    keys = {"type", "granularity", "points", "box", "mask", "text"}
    if set(p) != keys:
        raise _fail(row, f"prompt keys {sorted(p)} != {sorted(keys)}")
    parts = str(p["type"]).split("+")
    if not parts or any(t not in PROMPT_BASE_TYPES for t in parts):
        raise _fail(
            row, f"prompt type {p['type']!r}: expected one of {PROMPT_BASE_TYPES} or a '+'-joined mix"
        )
    if p["granularity"] not in GRANULARITIES:
        raise _fail(row, f"prompt granularity {p['granularity']!r} not in {GRANULARITIES}")
    for pt in p["points"] or []:
        if len(pt) != 3 or pt[2] not in (0, 1):
            raise _fail(row, f"point {pt} must be (x, y, label) with label 0 or 1")
        if not (0 <= pt[0] < width and 0 <= pt[1] < height):
            raise _fail(row, f"point {pt} outside the {width}x{height} image")
    if "point" in parts and not p["points"]:
        raise _fail(row, "point prompt without points")
    if p["box"] is not None:
        b = list(p["box"])
        if len(b) != 4 or not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height):
            raise _fail(row, f"box {b} is not (x0, y0, x1, y1) half-open inside {width}x{height}")
    elif "box" in parts:
        raise _fail(row, "box prompt without a box")
    if p["mask"] is not None:
        m = decode_mask(p["mask"])
        if m.shape != (height, width):
            raise _fail(row, f"prompt mask {m.shape[::-1]} does not match the image {width}x{height}")
    elif "mask" in parts:
        raise _fail(row, "mask prompt without a mask")
    if "text" in parts and not p["text"]:
        raise _fail(row, "text prompt without text")
    if p["text"] is not None and len(p["text"]) > 300:
        raise _fail(row, f"prompt text of {len(p['text'])} characters (at most 300)")


def validate_row(row: dict[str, Any], *, decode: bool = True) -> None:
    """Check one row against the format; with ``decode`` also decode its PNGs and check their shapes.

    Raises:
        SchemaError: naming the sample and the column.
    """
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise _fail(row, f"missing columns {missing}")
    extra = [c for c in row if c not in COLUMNS]
    if extra:
        raise _fail(row, f"unknown columns {extra}")
    if row["schema_version"] != SCHEMA_VERSION:
        raise _fail(row, f"schema_version {row['schema_version']} (this reader knows {SCHEMA_VERSION})")
    check_sample_id(row)
    if row["kind"] not in KINDS:
        raise _fail(row, f"kind {row['kind']!r} not in {KINDS}")
    if row["split"] not in SPLITS:
        raise _fail(row, f"split {row['split']!r} not in {SPLITS}")
    w, h = int(row["width"]), int(row["height"])
    if w <= 0 or h <= 0:
        raise _fail(row, f"bad size {w}x{h}")
    if not row["prompts"]:
        raise _fail(row, "no prompts")
    for p in row["prompts"]:
        validate_prompt(p, w, h, row)
    if decode:
        img = decode_image(row["image"])
        if img.shape[:2] != (h, w) or img.ndim != 3 or img.shape[2] != 3:
            raise _fail(row, f"image is {img.shape}, expected ({h}, {w}, 3) RGB")
        layer = decode_image(row["layer"])
        if layer.shape != (h, w, 4):
            raise _fail(row, f"layer is {layer.shape}, expected ({h}, {w}, 4) RGBA")
        if np.any(layer[..., :3][layer[..., 3] == 0]):
            raise _fail(row, "layer has RGB != 0 where alpha = 0 (straight alpha required)")
        if row["kind"] == "background" and not np.all(layer[..., 3] == 255):
            raise _fail(row, "background layer must be opaque everywhere")
        vm = decode_image(row["visible_mask"])
        if vm.shape != (h, w) or not np.isin(vm, (0, 255)).all():
            raise _fail(row, f"visible_mask is {vm.shape} with values other than 0/255")


# ---------------------------------------------------------------------------------------------- tables
def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["scores"] = {str(k): float(v) for k, v in (row.get("scores") or {}).items()}
    prov = dict(row.get("provenance") or {})
    out["provenance"] = {
        "engine_version": str(prov.get("engine_version", "")),
        "config_hash": str(prov.get("config_hash", "")),
        "backends": {str(k): str(v) for k, v in (prov.get("backends") or {}).items()},
        "weights": [str(w) for w in prov.get("weights") or []],
    }
    out["prompts"] = [
        {
            "type": p["type"],
            "granularity": p["granularity"],
            "points": [[int(v) for v in pt] for pt in p.get("points") or []],
            "box": None if p.get("box") is None else [int(v) for v in p["box"]],
            "mask": p.get("mask"),
            "text": p.get("text"),
        }
        for p in row["prompts"]
    ]
    return out


def rows_to_table(rows: Iterable[dict[str, Any]], *, validate: bool = True, decode: bool = False) -> pa.Table:
    """Rows (dicts) -> an Arrow table in the schema; validated unless told otherwise."""
    norm = []
    for r in rows:
        r = _normalise(r)
        if validate:
            validate_row(r, decode=decode)
        norm.append(r)
    # Arrow maps are lists of (key, value) pairs.
    for r in norm:
        r["scores"] = list(r["scores"].items())
        r["provenance"]["backends"] = list(r["provenance"]["backends"].items())
    return pa.Table.from_pylist(norm, schema=SCHEMA)


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """An Arrow table in the schema -> rows (maps as dicts)."""
    check_table(table)
    rows = table.to_pylist()
    for r in rows:
        r["scores"] = dict(r["scores"] or [])
        r["provenance"]["backends"] = dict(r["provenance"]["backends"] or [])
    return rows


def check_table(table: pa.Table) -> None:
    """Refuse a table whose schema version or columns this reader does not know."""
    meta = table.schema.metadata or {}
    version = meta.get(b"reflade.schema_version")
    if version is not None and int(version) != SCHEMA_VERSION:
        raise SchemaError(f"dataset has schema_version {int(version)}; this reader knows {SCHEMA_VERSION}")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise SchemaError(f"not an RLD dataset table: missing columns {missing}")
    if table.num_rows:
        versions = set(table.column("schema_version").to_pylist())
        if versions - {SCHEMA_VERSION}:
            raise SchemaError(
                f"rows with schema_version {sorted(versions)}; this reader knows {SCHEMA_VERSION}"
            )


def check_schema(schema: pa.Schema, where: str = "dataset") -> None:
    """Refuse a Parquet schema (a shard's footer) whose version or columns this reader does not know.

    Raises:
        SchemaError: naming ``where``, the version found and the one this reader knows, or the missing columns.
    """
    version = (schema.metadata or {}).get(b"reflade.schema_version")
    if version is not None and int(version) != SCHEMA_VERSION:
        raise SchemaError(f"{where} has schema_version {int(version)}; this reader knows {SCHEMA_VERSION}")
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise SchemaError(f"{where} is not an RLD dataset table: missing columns {missing}")


def _checked_batch(batch: pa.Table) -> pa.Table:
    check_table(batch)
    return batch


def write_shard(rows: Iterable[dict[str, Any]], path: str, filesystem=None, *, validate: bool = True) -> int:
    """Write rows as one Parquet file (local path, or ``bucket/key`` with a pyarrow filesystem)."""
    table = rows_to_table(rows, validate=validate)
    pq.write_table(table, path, filesystem=filesystem, compression="zstd")
    return table.num_rows


def _combine(tables: list[pa.Table], split: str | None) -> pa.Table:
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    check_table(table)
    if split:
        table = table.filter(pa.compute.equal(table.column("split"), split))
    return table


def read_table(paths: str | list[str], filesystem=None, split: str | None = None) -> pa.Table:
    """Read shards (local paths or ``bucket/key`` with a filesystem) into one table, optionally one split."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return _combine([pq.read_table(p, filesystem=filesystem) for p in paths], split)


def iter_rows(paths: str | list[str], filesystem=None, split: str | None = None) -> Iterator[dict[str, Any]]:
    yield from table_to_rows(read_table(paths, filesystem, split))


# ---------------------------------------------------------------------------------------------- registry
def shard_files(version) -> list[dict[str, Any]]:
    """The layer shards of a registered dataset version (``shards/*.parquet``)."""
    return [f for f in version.files if f["path"].startswith("shards/") and f["path"].endswith(".parquet")]


def _dataset_version(registry, ref: str):
    v = registry.resolve(ref)
    if v.kind != "dataset":
        raise SchemaError(f"{v.ref} is a {v.kind}, not a dataset")
    return v


def load_rows(registry, ref: str, split: str | None = None) -> list[dict[str, Any]]:
    """Every row of a dataset version (plain Python); ``split`` or the reference's ``:SPLIT`` filters.

    Each shard's bytes are checked against the version's manifest (sha256 and size) before they are parsed.

    Raises:
        SchemaError: not a dataset, or a schema version this reader does not know.
        IntegrityError: a shard differs from its manifest.
    """
    from reflade.engine.shard_integrity import shard_bytes

    v = _dataset_version(registry, ref)
    tables = [pq.read_table(pa.BufferReader(shard_bytes(registry, v, f))) for f in shard_files(v)]
    return table_to_rows(_combine(tables, split or v.split))


def read_dataset(registry, ref: str, split: str | None = None):
    """A Ray Data dataset over a version's shards, read in place from the object store.

    The driver first checks every shard against the manifest (``shard_integrity.verify_shards``, once per
    object and process), then reads each footer; the read tasks then read the same objects in place.

    Raises:
        SchemaError: not a dataset, or a schema version this reader does not know.
        IntegrityError: a shard differs from its manifest.
    """
    import ray.data

    from reflade.engine.shard_integrity import verify_shards

    v = _dataset_version(registry, ref)
    verify_shards(registry, v)
    paths = [registry.storage.path(v.key(f["path"])) for f in shard_files(v)]
    # Footers first (one small read per shard, on this process): an unknown schema_version or a missing
    # column fails here, before any task starts, as load_rows fails.
    for path in paths:
        check_schema(pq.read_schema(path, filesystem=registry.storage.fs), where=f"{v.ref}: {path}")
    ds = ray.data.read_parquet(paths, filesystem=registry.storage.fs)
    # Rows too (a shard written by another writer may lack the footer's version): fused into the read tasks.
    ds = ds.map_batches(_checked_batch, batch_format="pyarrow", zero_copy_batch=True)
    split = split or v.split
    if split:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("split") == split)
    return ds
