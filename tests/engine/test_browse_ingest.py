"""Datasets for people (export / import / stats, via the CLI) and the engine's input forms (folder, s3:// prefix,
manifest, registry reference)."""

from __future__ import annotations

import hashlib
import json
import re
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


# ---------------------------------------------------------------------------------------------- hostile folders
def test_export_refuses_a_row_whose_folder_leaves_dest(tmp_path):
    good, hostile = make_row(0), make_row(1)
    hostile["sample_id"] = "../../../escaped"  # train/foreground/../../../escaped is tmp_path/escaped
    dest = tmp_path / "out"
    with pytest.raises(SchemaError, match=r"'\.\./\.\./\.\./escaped': sample_id must be \[0-9a-f\]\{32\}"):
        export_rows([good, hostile], dest)
    assert not (tmp_path / "escaped").exists()
    assert not dest.exists()  # every row is checked before the first is written
    bad_split = make_row(2)
    bad_split["split"] = "../../escaped"
    with pytest.raises(SchemaError, match="split '../../escaped' not in"):
        export_rows([bad_split], dest)
    assert not (tmp_path / "escaped").exists() and not dest.exists()


def test_export_refuses_a_link_out_of_dest(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "train").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SchemaError, match="leaves .*out: refused"):
        export_rows([make_row(0)], dest)
    assert list(outside.iterdir()) == []


def _exported(tmp_path):
    export_rows([make_row(0), make_row(1)], tmp_path / "x")
    folder = sorted((tmp_path / "x").rglob("sample.json"))[0].parent
    return tmp_path / "x", folder


def _edit_meta(folder, change):
    meta = json.loads((folder / "sample.json").read_text())
    change(meta)
    (folder / "sample.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "mask_path", ["/etc/passwd", "ABSOLUTE_OUTSIDE", "../../../../outside_mask.png", "../prompt_2_mask.png"]
)
def test_import_refuses_a_mask_path_out_of_its_folder(tmp_path, mask_path):
    src, folder = _exported(tmp_path)
    # A valid mask of the right size outside the folder: without the check the import would succeed with it.
    outside = tmp_path / "outside_mask.png"
    outside.write_bytes((folder / "prompt_2_mask.png").read_bytes())
    (folder.parent / "prompt_2_mask.png").write_bytes(outside.read_bytes())
    if mask_path == "ABSOLUTE_OUTSIDE":
        mask_path = str(outside)
    _edit_meta(folder, lambda m: m["prompts"][2].update(mask=mask_path))
    with pytest.raises(SchemaError, match=rf"prompt 2's mask '{re.escape(mask_path)}' leaves .*: refused"):
        import_folder(src)


@pytest.mark.parametrize("name", ["layer.png", "sample.json"])
def test_import_refuses_a_file_linked_out_of_its_folder(tmp_path, name):
    src, folder = _exported(tmp_path)
    outside = tmp_path / f"outside_{name}"
    outside.write_bytes((folder / name).read_bytes())  # valid content: only the link is wrong
    (folder / name).unlink()
    (folder / name).symlink_to(outside)
    with pytest.raises(SchemaError, match=rf"{re.escape(name)} '{re.escape(name)}' leaves .*: refused"):
        import_folder(src)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(sample_id="../x"), r"sample '\.\./x': sample_id must be"),
        (lambda m: m["prompts"][2].update(mask=7), "prompt 2's mask must be a file name, not 7"),
        (lambda m: m.update(prompts="none"), "sample folder .*: ValueError"),
        (lambda m: m.pop("source_id"), "sample folder .*: KeyError"),
    ],
)
def test_import_refuses_a_hostile_sample_json(tmp_path, change, message):
    src, folder = _exported(tmp_path)
    _edit_meta(folder, change)
    with pytest.raises(SchemaError, match=message):
        import_folder(src)


def test_import_names_a_file_that_is_no_picture(tmp_path):
    src, folder = _exported(tmp_path)
    (folder / "prompt_2_mask.png").write_text("root:x:0:0")  # inside its folder, but not a PNG
    with pytest.raises(SchemaError, match=r"sample folder .*: UnidentifiedImageError"):
        import_folder(src)


def test_data_cli_refuses_hostile_export_and_import(registry_env, tmp_path, capsys):
    registry = registry_env
    hostile = make_row(1)
    hostile["sample_id"] = "../../../../escaped"
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    write_shard([make_row(0), hostile], str(tmp_path / "ds" / "shards" / "a.parquet"), validate=False)
    v = registry.create("dataset", "hostile", tmp_path / "ds")
    assert cli_main(["data", "export", v.ref, str(tmp_path / "export")]) != 0
    assert "sample_id must be [0-9a-f]{32}" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "export").exists()

    src, folder = _exported(tmp_path)
    _edit_meta(folder, lambda m: m["prompts"][2].update(mask="/etc/passwd"))
    assert cli_main(["data", "import", str(src), "--dataset", "curated-hostile"]) != 0
    assert "'/etc/passwd' leaves" in capsys.readouterr().err.replace("\n", "")
    assert registry.versions("dataset", "curated-hostile") == []  # refused whole: nothing registered


def test_manifest_records_with_a_malformed_sha256_are_set_aside(storage, registry, tmp_path):
    key = f"{registry.prefix}inputs/ok.bin"
    storage.put_bytes(key, b"okay")
    good = hashlib.sha256(b"okay").hexdigest()
    records = [
        {"key": key, "name": "computed"},
        {"key": key, "name": "upper", "sha256": good.upper(), "size": 4},
        {"key": key, "name": "traversal", "sha256": "../../etc/passwd"},
        {"key": key, "name": "short", "sha256": "ab" * 31},
        {"key": key, "name": "number", "sha256": 12},
        {"key": key, "name": "bad-size", "sha256": good, "size": "four"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    got = ingest(str(manifest), storage, registry)
    assert [(i.name, i.sha256) for i in got.items] == [("computed", good), ("upper", good)]
    reasons = {r.name: r.quarantine_row() for r in got.rejected}
    assert sorted(reasons) == ["bad-size", "number", "short", "traversal"]
    assert reasons["traversal"]["reason"] == (
        "bad_sha256: '../../etc/passwd' is not 64 hex digits (manifest record 2)"
    )
    assert {r["reason_code"] for n, r in reasons.items() if n != "bad-size"} == {"bad_sha256"}
    assert reasons["bad-size"]["reason_code"] == "bad_size"
    assert all(r["stage"] == "ingest" and r["entity_id"] is None for r in reasons.values())
    not_json = tmp_path / "broken.json"
    not_json.write_text("{not json")
    with pytest.raises(IngestError, match="is not valid JSON"):
        ingest(str(not_json), storage, registry)
