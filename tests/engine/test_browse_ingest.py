"""Datasets for people (export / import / stats, via the CLI) and the engine's input forms (folder, s3:// prefix,
manifest, registry reference)."""

from __future__ import annotations

import json
import shutil

import pytest
from test_schema import make_row

from reflade.engine.browse import export_rows, import_folder, stats
from reflade.engine.ingest import IngestError, ingest, raw_key
from reflade.engine.schema import SchemaError, decode_image, load_rows, write_shard
from reflade.platform.cli import main as cli_main


def test_export_then_import_round_trips(tmp_path):
    rows = [make_row(i, kind) for i in range(3) for kind in ("foreground", "background")]
    assert export_rows(rows, tmp_path / "x") == 6
    sample = tmp_path / "x" / "train" / "foreground" / rows[0]["sample_id"]
    for name in (
        "image.png",
        "layer.png",
        "layer_on_checkerboard.png",
        "visible_mask.png",
        "prompts.png",
        "sample.json",
        "prompt_2_mask.png",
    ):
        assert (sample / name).is_file(), name
    checker = decode_image((sample / "layer_on_checkerboard.png").read_bytes())
    assert checker.shape == (32, 48, 3) and len({tuple(p) for p in checker[0, :16]}) >= 2  # checker visible
    back = import_folder(tmp_path / "x")
    assert sorted(r["sample_id"] for r in back) == sorted(r["sample_id"] for r in rows)
    by_id = {r["sample_id"]: r for r in back}
    for r in rows:
        b = by_id[r["sample_id"]]
        assert b["split"] == "quality"
        assert b["layer"] == r["layer"] and b["visible_mask"] == r["visible_mask"]
        assert [p["box"] for p in b["prompts"]] == [p["box"] for p in r["prompts"]]
        assert [p["mask"] for p in b["prompts"]] == [p["mask"] for p in r["prompts"]]
    assert {r["split"] for r in import_folder(tmp_path / "x", split=None)} == {"train"}


def test_import_refuses_a_broken_sample(tmp_path):
    export_rows([make_row(0)], tmp_path / "x")
    folder = next((tmp_path / "x").rglob("sample.json")).parent
    (folder / "layer.png").unlink()
    with pytest.raises(SchemaError, match="layer.png"):
        import_folder(tmp_path / "x")
    with pytest.raises(SchemaError, match="no sample folders"):
        import_folder(tmp_path / "empty")


def test_stats_counts():
    rows = [
        make_row(i, kind, split)
        for i, split in ((0, "train"), (1, "test"))
        for kind in ("foreground", "background")
    ]
    s = stats(rows)
    assert s["rows"] == 4 and s["sources"] == 2
    assert s["by_split"] == {"train": 2, "test": 2}
    assert s["by_kind"] == {"foreground": 2, "background": 2}
    assert s["by_prompt_type"]["text+box/coarse"] == 4


def test_data_cli_export_import_stats(registry_env, tmp_path, capsys):
    registry = registry_env
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    write_shard([make_row(i) for i in range(3)], str(tmp_path / "ds" / "shards" / "a.parquet"))
    v = registry.create("dataset", "browse-src", tmp_path / "ds")
    assert cli_main(["data", "stats", v.ref, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    assert cli_main(["data", "export", v.ref, str(tmp_path / "export")]) == 0
    # A person curates: drops one sample.
    shutil.rmtree(next((tmp_path / "export").rglob("sample.json")).parent)
    assert (
        cli_main(["data", "import", str(tmp_path / "export"), "--dataset", "curated", "--parent", v.ref]) == 0
    )
    curated = load_rows(registry, "dataset/curated")
    assert len(curated) == 2 and {r["split"] for r in curated} == {"quality"}
    assert registry.children(v.ref) == ["dataset/curated@1"]


def test_ingest_forms(storage, registry, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"alpha")
    (folder / "b.bin").write_bytes(b"beta")
    (folder / "c.bin").write_bytes(b"alpha")  # same bytes: same source id
    first = ingest(str(folder), storage, registry, progress=False)
    assert len(first.items) == 3 and first.items[0].source_id == first.items[2].source_id
    assert storage.get_bytes(raw_key(first.items[1].sha256))[0] == b"beta"
    again = ingest(str(folder), storage, registry, progress=False)
    assert again.uploaded == 0 and again.items == first.items

    prefix = f"{registry.prefix}inputs/"
    for name, body in (("x.jpg", b"xx"), ("y.jpg", b"yyy")):
        storage.put_bytes(prefix + name, body)
    by_prefix = ingest(storage.uri(prefix), storage, registry)
    assert sorted(i.size for i in by_prefix.items) == [2, 3]

    manifest = tmp_path / "m.json"
    manifest.write_text(
        json.dumps([{"key": prefix + "x.jpg", "name": "ex"}, {"uri": storage.uri(prefix + "y.jpg")}])
    )
    by_manifest = ingest(str(manifest), storage, registry)
    assert [i.name for i in by_manifest.items] == ["ex", prefix + "y.jpg"]
    assert by_manifest.items[0].sha256 == by_prefix.items[0].sha256

    v = registry.create("raw-images", "few", folder)
    by_ref = ingest("raw-images/few", storage, registry)
    assert by_ref.parents == [v.ref] and len(by_ref.items) == 3

    with pytest.raises(IngestError, match="not a folder"):
        ingest("no/such/thing/here", storage, registry)
    with pytest.raises(IngestError, match="configured bucket"):
        ingest("s3://another-bucket/x/", storage, registry)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "no key"}]))
    with pytest.raises(IngestError, match="neither 'key' nor 'uri'"):
        ingest(str(bad), storage, registry)
