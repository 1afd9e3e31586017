"""The RLD sample format: validation, round trips, version refusal, registry readers (plain and Ray Data)."""

from __future__ import annotations

import copy
import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reflade.engine.schema import (
    SAMPLE_ID_PATTERN,
    SCHEMA,
    SCHEMA_VERSION,
    SchemaError,
    decode_image,
    decode_mask,
    encode_png,
    load_rows,
    make_sample_id,
    read_dataset,
    read_table,
    rows_to_table,
    table_to_rows,
    validate_row,
    write_shard,
)
from reflade.engine.shard_integrity import verify_shards
from reflade.platform.registry import IntegrityError


def make_row(i: int = 0, kind: str = "foreground", split: str = "train") -> dict:
    h, w = 32, 48
    rng = np.random.default_rng(i)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[8:20, 10:30] = True
    layer = np.zeros((h, w, 4), np.uint8)
    if kind == "foreground":
        layer[mask, :3] = image[mask]
        layer[mask, 3] = 255
        visible = mask
    else:
        layer[..., :3] = image
        layer[..., 3] = 255
        visible = ~mask
    sha = hashlib.sha256(str(i).encode()).hexdigest()
    return {
        "schema_version": SCHEMA_VERSION,
        "sample_id": make_sample_id(sha, 0, kind, "cfg"),
        "source_id": sha[:16],
        "source_sha256": sha,
        "image": encode_png(image),
        "width": w,
        "height": h,
        "layer": encode_png(layer),
        "visible_mask": encode_png(visible),
        "kind": kind,
        "category": "mug",
        "prompts": [
            {
                "type": "point",
                "granularity": "fine",
                "points": [[12, 10, 1], [2, 2, 0]],
                "box": None,
                "mask": None,
                "text": None,
            },
            {
                "type": "text+box",
                "granularity": "coarse",
                "points": [],
                "box": [10, 8, 30, 20],
                "mask": None,
                "text": "the red mug on the left",
            },
            {
                "type": "mask",
                "granularity": "fine",
                "points": [],
                "box": None,
                "mask": encode_png(mask),
                "text": None,
            },
        ],
        "split": split,
        "scores": {"sharpness": 120.5},
        "provenance": {
            "engine_version": "0.1.0",
            "config_hash": "cfg",
            "backends": {"scene": "classical"},
            "weights": [],
        },
    }


def test_sample_id_is_deterministic_and_distinct():
    a = make_sample_id("ab" * 32, 1, "foreground", "c1")
    assert a == make_sample_id("ab" * 32, 1, "foreground", "c1")
    assert (
        len(
            {
                a,
                make_sample_id("ab" * 32, 1, "background", "c1"),
                make_sample_id("ab" * 32, 2, "foreground", "c1"),
                make_sample_id("ab" * 32, 1, "foreground", "c2"),
            }
        )
        == 4
    )


def test_round_trip_through_parquet(tmp_path):
    rows = [make_row(i, kind) for i in range(3) for kind in ("foreground", "background")]
    path = tmp_path / "s.parquet"
    assert write_shard(rows, str(path)) == 6
    back = table_to_rows(read_table(str(path)))
    assert [r["sample_id"] for r in back] == [r["sample_id"] for r in rows]
    assert back[0]["prompts"][1]["box"] == [10, 8, 30, 20]
    assert back[0]["scores"] == {"sharpness": 120.5}
    assert back[0]["provenance"]["backends"] == {"scene": "classical"}
    assert decode_mask(back[0]["prompts"][2]["mask"]).sum() == 12 * 20
    assert decode_image(back[1]["layer"]).shape == (32, 48, 4)
    for r in back:
        validate_row(r)
    assert read_table(str(path), split="test").num_rows == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(kind="middle"), "kind 'middle'"),
        (lambda r: r.update(split="val"), "split 'val'"),
        (lambda r: r.update(schema_version=99), "schema_version 99"),
        (lambda r: r["prompts"][0]["points"].append([100, 5, 1]), "outside the 48x32 image"),
        (lambda r: r["prompts"][0]["points"].append([5, 5, 2]), "label 0 or 1"),
        (lambda r: r["prompts"][1].update(box=[30, 8, 10, 20]), "half-open"),
        (lambda r: r["prompts"][1].update(type="text+lasso"), "prompt type"),
        (lambda r: r["prompts"][1].update(text=None), "text prompt without text"),
        (
            lambda r: r["prompts"][2].update(mask=encode_png(np.zeros((5, 5), bool))),
            "does not match the image",
        ),
        (lambda r: r.update(prompts=[]), "no prompts"),
        (lambda r: r.pop("category"), "missing columns"),
        (lambda r: r.update(width=47), "does not match the image 47x32"),
        (lambda r: r.update(width=47, prompts=r["prompts"][:2]), "expected (32, 47, 3) RGB"),
        (
            lambda r: r.update(
                layer=encode_png(np.full((32, 48, 4), 7, np.uint8) * np.array([1, 1, 1, 0], np.uint8))
            ),
            "RGB != 0 where alpha = 0",
        ),
    ],
)
def test_invalid_rows_are_named(mutate, message):
    row = copy.deepcopy(make_row())
    mutate(row)
    with pytest.raises(SchemaError, match=re.escape(message)):
        validate_row(row)
        rows_to_table([row], decode=True)


@pytest.mark.parametrize(
    "sample_id",
    ["../x", "../../../etc/passwd", "0" * 31, "0" * 33, "A" * 32, "0" * 32 + "\n", "", None, 7, "g" * 32],
)
def test_sample_id_must_match_the_pattern(sample_id):
    assert SAMPLE_ID_PATTERN == "[0-9a-f]{32}"
    row = make_row()
    row["sample_id"] = sample_id
    with pytest.raises(SchemaError, match=re.escape(f"sample_id must be {SAMPLE_ID_PATTERN}")) as e:
        validate_row(row, decode=False)
    assert "\n" not in str(e.value)  # a hostile id is quoted, never echoed raw
    with pytest.raises(SchemaError, match="sample_id must be"):
        rows_to_table([row])  # every writer validates


def test_background_must_be_opaque():
    row = make_row(kind="background")
    layer = decode_image(row["layer"])
    layer[0, 0, 3] = 0
    layer[0, 0, :3] = 0
    row["layer"] = encode_png(layer)
    with pytest.raises(SchemaError, match="opaque"):
        validate_row(row)


def test_reader_refuses_unknown_schema_version(tmp_path):
    table = rows_to_table([make_row()])
    newer = table.replace_schema_metadata({b"reflade.schema_version": b"2"})
    pq.write_table(newer, tmp_path / "n.parquet")
    with pytest.raises(SchemaError, match="schema_version 2"):
        read_table(str(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(SchemaError, match="missing columns"):
        read_table(str(tmp_path / "x.parquet"))
    assert SCHEMA.metadata[b"reflade.schema_version"] == str(SCHEMA_VERSION).encode()


def test_registry_readers_plain_and_ray(registry, tmp_path, ray_cluster):
    shards = tmp_path / "ds" / "shards"
    shards.mkdir(parents=True)
    write_shard([make_row(i, split="train") for i in range(4)], str(shards / "a.parquet"))
    write_shard([make_row(i + 10, split="test") for i in range(2)], str(shards / "b.parquet"))
    v = registry.create("dataset", "tiny", tmp_path / "ds")
    assert len(load_rows(registry, v.ref)) == 6
    assert {r["split"] for r in load_rows(registry, f"{v.ref}:test")} == {"test"}
    assert len(load_rows(registry, "dataset/tiny", split="train")) == 4
    ds = read_dataset(registry, f"{v.ref}:test")
    rows = ds.take_all()
    assert len(rows) == 2 and {r["split"] for r in rows} == {"test"}
    other = registry.create(
        "weights", "not-a-dataset", files={"w.bin": tmp_path / "ds" / "shards" / "a.parquet"}
    )
    with pytest.raises(SchemaError, match="not a dataset"):
        load_rows(registry, other.ref)


def test_ray_reader_refuses_unknown_schema_version(registry, tmp_path, ray_cluster):
    # A newer writer's footer: refused on the driver, before any task runs, as load_rows refuses it.
    newer = tmp_path / "newer" / "shards"
    newer.mkdir(parents=True)
    table = rows_to_table([make_row(1, split="train")])
    pq.write_table(table.replace_schema_metadata({b"reflade.schema_version": b"99"}), newer / "a.parquet")
    v = registry.create("dataset", "newer", tmp_path / "newer")
    with pytest.raises(SchemaError, match="schema_version 99"):
        read_dataset(registry, v.ref)
    with pytest.raises(SchemaError, match="schema_version 99"):
        load_rows(registry, v.ref)
    # No footer version, but the rows say 99: refused when the rows are read.
    rowwise = tmp_path / "rowwise" / "shards"
    rowwise.mkdir(parents=True)
    bumped = table.set_column(
        table.schema.get_field_index("schema_version"),
        "schema_version",
        pa.array([99], pa.int32()),
    ).replace_schema_metadata(None)
    pq.write_table(bumped, rowwise / "a.parquet")
    v2 = registry.create("dataset", "rowwise", tmp_path / "rowwise")
    # Ray Data wraps the reader's SchemaError in its UserCodeException; the message is the reader's.
    with pytest.raises(Exception, match=r"rows with schema_version \[99\]; this reader knows"):
        read_dataset(registry, v2.ref).take_all()


def _one_dataset(registry, tmp_path, name: str):
    shards = tmp_path / name / "shards"
    shards.mkdir(parents=True)
    write_shard([make_row(i) for i in range(3)], str(shards / "a.parquet"))
    write_shard([make_row(i + 10, split="test") for i in range(2)], str(shards / "b.parquet"))
    return registry.create("dataset", name, tmp_path / name)


def test_readers_verify_shards_against_the_manifest(registry, storage, tmp_path, ray_cluster):
    v = _one_dataset(registry, tmp_path, "verified")
    assert len(load_rows(registry, v.ref)) == 5
    # load_rows hashed both shards: the driver's check in read_dataset reads neither again (same ETags).
    assert verify_shards(registry, v) == 0
    assert len(read_dataset(registry, v.ref).take_all()) == 5

    # The object is replaced in place by another valid shard of the same version: both readers refuse it,
    # although its rows would parse (without the check they would be served as the version's).
    key = v.key("shards/a.parquet")
    other = storage.get_bytes(v.key("shards/b.parquet"))[0]
    storage.put_bytes(key, other)
    with pytest.raises(IntegrityError, match=r"dataset/verified@1: shard 'shards/a.parquet' is corrupt"):
        load_rows(registry, v.ref)
    with pytest.raises(IntegrityError, match=r"shard 'shards/a.parquet' is corrupt"):
        read_dataset(registry, v.ref)

    # Same size, one byte changed: caught by the sha256 (not the size), before Parquet parses anything.
    original = (tmp_path / "verified" / "shards" / "a.parquet").read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    storage.put_bytes(key, bytes(flipped))
    with pytest.raises(
        IntegrityError, match=rf"sha256 [0-9a-f]{{12}}\.\.\., {len(original)} bytes; the manifest"
    ):
        load_rows(registry, v.ref)
    with pytest.raises(IntegrityError, match=r"sha256 [0-9a-f]{12}\.\.\.;"):
        verify_shards(registry, v)

    # Put back: read again.
    storage.put_bytes(key, original)
    assert len(load_rows(registry, v.ref)) == 5


def test_a_missing_shard_is_named(registry, storage, tmp_path):
    v = _one_dataset(registry, tmp_path, "lost")
    storage.delete([v.key("shards/b.parquet")])
    with pytest.raises(
        IntegrityError, match=r"shard 'shards/b.parquet' is corrupt in the object store \(missing"
    ):
        verify_shards(registry, v)
