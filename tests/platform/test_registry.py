"""The artifact registry against a real SeaweedFS: round trips, manifests, dedup, racing writers (threads and
Ray tasks), alias compare-and-swap, integrity, names and references, lineage, gc."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reflade.platform.registry import (
    IntegrityError,
    Ref,
    Registry,
    RegistryError,
    validate_alias,
    validate_name,
)
from reflade.platform.storage import Storage


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_file_version(registry, tmp_path: Path, kind: str, name: str, data: bytes, **kw):
    src = _write(tmp_path / f"src-{uuid.uuid4().hex[:8]}" / "file.bin", data)
    return registry.create(kind, name, src, progress=False, **kw)


# ---------------------------------------------------------------------------------------------- round trips
def test_single_file_round_trip(registry, tmp_path):
    data = os.urandom(10_000)
    src = _write(tmp_path / "weights.bin", data)
    v = registry.create("weights", "tiny", src, progress=False)
    assert v.version == 1 and not v.reused
    assert [f["path"] for f in v.files] == ["weights.bin"]
    out = registry.download("weights/tiny", tmp_path / "out", progress=False)
    assert _tree(out) == {"weights.bin": data}
    assert registry.read_bytes("weights/tiny@1", "weights.bin") == data


def test_large_file_goes_up_in_parts(storage_config, registry, tmp_path):
    """Files above the multipart threshold take Storage.upload_file; the version still verifies."""
    st = Storage(dataclasses.replace(storage_config, multipart_threshold_mb=5, multipart_chunk_mb=5))
    reg = Registry(st, prefix=registry.prefix)
    data = os.urandom(11 * 1024 * 1024 + 7)
    src = _write(tmp_path / "big" / "model.bin", data)
    _write(tmp_path / "big" / "small.json", b"{}")
    v = reg.create("weights", "big", tmp_path / "big", progress=False)
    assert st.head(v.key("model.bin"))["ETag"].strip('"').endswith("-3")  # 3 parts of <= 5 MiB
    out = reg.download(v.ref, tmp_path / "out", progress=False)
    assert _sha((out / "model.bin").read_bytes()) == _sha(src.read_bytes())
    assert (out / "small.json").read_bytes() == b"{}"


def test_folder_round_trip_with_nested_folders(registry, tmp_path):
    src = tmp_path / "ds"
    files = {
        "README.txt": b"a dataset\n",
        "train/shard-000.bin": os.urandom(5000),
        "train/shard-001.bin": os.urandom(5001),
        "test/deep/er/shard-000.bin": os.urandom(777),
        "test/empty.txt": b"",
    }
    for rel, data in files.items():
        _write(src / rel, data)
    v = registry.create("dataset", "nested", src, progress=False)
    assert sorted(f["path"] for f in v.files) == sorted(files)
    out = registry.download(v.ref, tmp_path / "out", progress=False)
    assert _tree(out) == files
    # No temporary download files are left behind.
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def test_manifest_records_everything(registry, tmp_path):
    before = datetime.now(UTC).replace(microsecond=0)
    data = b"model weights " * 100
    src = _write(tmp_path / "m" / "model.safetensors", data)
    v = registry.create(
        "weights",
        "sd-tiny",
        tmp_path / "m",
        license="apache-2.0",
        source="https://example.org/sd-tiny",
        creator="tester@ci",
        metadata={"preset": "tiny"},
        metrics={"loss": 0.5},
        progress=False,
    )
    m = registry.resolve("weights/sd-tiny@1").manifest
    assert m["kind"] == "weights" and m["name"] == "sd-tiny" and m["version"] == 1
    assert m["files"] == [{"path": "model.safetensors", "sha256": _sha(data), "size": len(data)}]
    assert m["license"] == "apache-2.0"
    assert m["source"] == "https://example.org/sd-tiny"
    assert m["creator"] == "tester@ci"
    assert m["metadata"] == {"preset": "tiny"} and m["metrics"] == {"loss": 0.5}
    created = datetime.strptime(m["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= created <= datetime.now(UTC)
    assert m == v.manifest
    assert os.path.getsize(src) == v.size()
    # The files live under the version's own prefix, inside the registry's prefix.
    assert m["prefix"].startswith(f"{registry.prefix}weights/sd-tiny/objects/")
    assert registry.storage.exists(v.key("model.safetensors"))


def test_default_creator_is_recorded(registry, tmp_path):
    v = _one_file_version(registry, tmp_path, "dataset", "who", b"x")
    assert v.manifest["creator"] and "@" in v.manifest["creator"]


# ---------------------------------------------------------------------------------------------- dedup
def test_identical_content_is_reused(registry, tmp_path):
    src = tmp_path / "d"
    _write(src / "a.txt", b"alpha")
    _write(src / "sub" / "b.txt", b"beta")
    v1 = registry.create("dataset", "dedup", src, progress=False)
    # Same bytes, another folder on disk: still the same content.
    copy = tmp_path / "copy"
    _write(copy / "a.txt", b"alpha")
    _write(copy / "sub" / "b.txt", b"beta")
    again = registry.create("dataset", "dedup", copy, progress=False)
    assert again.reused is True
    assert again.version == v1.version == 1
    assert registry.versions("dataset", "dedup") == [1]
    # One changed byte is new content, a new version.
    _write(copy / "sub" / "b.txt", b"betA")
    v2 = registry.create("dataset", "dedup", copy, progress=False)
    assert (v2.version, v2.reused) == (2, False)
    # dedup=False forces a new version even for identical content.
    v3 = registry.create("dataset", "dedup", src, dedup=False, progress=False)
    assert (v3.version, v3.reused) == (3, False)


# ---------------------------------------------------------------------------------------------- racing writers
def test_concurrent_writers_threads(registry, tmp_path):
    n = 8
    contents = {i: f"writer {i} ".encode() * (100 + i) for i in range(n)}
    srcs = {i: _write(tmp_path / f"w{i}" / "part.txt", data) for i, data in contents.items()}
    barrier = threading.Barrier(n)

    def make(i: int):
        barrier.wait(timeout=30)
        return i, registry.create("dataset", "shared", srcs[i], progress=False)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(make, range(n)))
    numbers = sorted(v.version for _, v in results)
    assert numbers == list(range(1, n + 1))
    assert not any(v.reused for _, v in results)
    assert registry.versions("dataset", "shared") == list(range(1, n + 1))
    assert registry.resolve("dataset/shared").version == n
    for i, v in results:
        out = registry.download(f"dataset/shared@{v.version}", tmp_path / f"out{i}", progress=False)
        assert _tree(out) == {"part.txt": contents[i]}


def test_concurrent_writers_ray_tasks(ray_cluster, registry, storage):
    ray = ray_cluster
    n = 8
    prefix = registry.prefix.rstrip("/")
    gate = f"gate-{uuid.uuid4().hex[:10]}/"

    @ray.remote(num_cpus=0.25)
    def make_version(registry_prefix: str, i: int, gate_prefix: str):
        import tempfile
        import time
        from pathlib import Path

        from reflade.platform.config import load_config
        from reflade.platform.registry import Registry

        cfg = load_config()
        cfg.registry.prefix = registry_prefix
        reg = Registry.from_config(cfg)
        # A barrier in the bucket: every task is ready before any writes, so they race.
        reg.storage.put_bytes(f"{gate_prefix}ready-{i}", b"")
        deadline = time.monotonic() + 60
        while not reg.storage.exists(f"{gate_prefix}go") and time.monotonic() < deadline:
            time.sleep(0.02)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "part.txt"
            p.write_bytes(f"ray writer {i} ".encode() * (50 + i))
            v = reg.create("dataset", "shared-ray", p, progress=False)
        return i, v.version, reg.storage._creds.source

    refs = [make_version.remote(prefix, i, gate) for i in range(n)]
    deadline = time.monotonic() + 90
    while len(list(storage.list(gate))) < n:
        finished, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if finished:
            ray.get(finished)  # a task that ends before the gate opens has failed: show why
            pytest.fail("a Ray task finished before the gate opened")
        assert time.monotonic() < deadline, "Ray tasks did not start"
        time.sleep(0.05)
    storage.put_bytes(gate + "go", b"")
    results = ray.get(refs, timeout=120)
    storage.delete([o["Key"] for o in storage.list(gate)])

    assert sorted(v for _, v, _ in results) == list(range(1, n + 1))
    # Workers took the credentials from the 0600 file named in their environment, not from a runtime_env.
    assert all(src.startswith("file ") for _, _, src in results), results
    assert registry.versions("dataset", "shared-ray") == list(range(1, n + 1))
    for i, number, _ in results:
        data = registry.read_bytes(f"dataset/shared-ray@{number}", "part.txt")
        assert data == f"ray writer {i} ".encode() * (50 + i)


def test_concurrent_alias_moves_lose_nothing(registry, tmp_path):
    n = 16
    for i in range(n):
        _one_file_version(registry, tmp_path, "model", "reflayer", f"ckpt {i}".encode())
    assert registry.versions("model", "reflayer") == list(range(1, n + 1))
    barrier = threading.Barrier(n)

    def move(i: int):
        barrier.wait(timeout=30)
        return registry.set_alias(f"model/reflayer@{i + 1}", "candidate", creator=f"mover-{i}")

    with ThreadPoolExecutor(n) as pool:
        moves = list(pool.map(move, range(n)))
    history = registry.alias_history("model", "reflayer", "candidate")
    assert len(history) == n
    assert history[0]["from"] is None
    for prev, cur in zip(history, history[1:], strict=False):
        assert cur["from"] == prev["to"]
    assert sorted(h["to"] for h in history) == list(range(1, n + 1))
    assert sorted(h["by"] for h in history) == sorted(f"mover-{i}" for i in range(n))
    # Each mover saw the state its swap replaced: the returned moves are the history's entries.
    assert sorted((m.from_version or 0, m.to_version) for m in moves) == sorted(
        (h["from"] or 0, h["to"]) for h in history
    )
    assert registry.resolve("model/reflayer@candidate").version == history[-1]["to"]
    assert registry.aliases("model", "reflayer")["candidate"] == history[-1]["to"]


def test_alias_move_with_expected_version_loses_a_race(registry, tmp_path):
    from reflade.platform.registry import AliasConflict

    for i in range(6):
        _one_file_version(registry, tmp_path, "model", "cas", f"cas {i}".encode())
    with pytest.raises(AliasConflict, match="expected version 1"):
        registry.set_alias("model/cas@2", "production", expected=1)  # no alias yet
    registry.set_alias("model/cas@1", "production", expected=None)
    with pytest.raises(AliasConflict, match="points at version 1, expected none"):
        registry.set_alias("model/cas@2", "production", expected=None)
    # Five movers all expect @1: exactly one wins, the others see who did and change nothing.
    barrier = threading.Barrier(5)

    def move(i: int):
        barrier.wait(timeout=30)
        try:
            return registry.set_alias(f"model/cas@{i + 2}", "production", expected=1, creator=f"m{i}")
        except AliasConflict as e:
            return e

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(move, range(5)))
    wins = [r for r in results if not isinstance(r, AliasConflict)]
    assert len(wins) == 1 and wins[0].from_version == 1
    assert all(r.current == wins[0].to_version for r in results if isinstance(r, AliasConflict))
    history = registry.alias_history("model", "cas", "production")
    assert [(h["from"], h["to"]) for h in history] == [(None, 1), (1, wins[0].to_version)]


# ---------------------------------------------------------------------------------------------- integrity
def test_corrupt_blob_is_detected(registry, tmp_path):
    data = os.urandom(4096)
    v = _one_file_version(registry, tmp_path, "model", "corrupt", data)
    # Same size, one byte flipped: only the sha256 can tell.
    bad = bytes([data[0] ^ 0xFF]) + data[1:]
    registry.storage.put_bytes(v.key("file.bin"), bad)
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError) as e:
        registry.download(v.ref, dest, progress=False)
    assert "file.bin" in str(e.value)
    assert not dest.exists() or [p for p in dest.rglob("*") if p.is_file()] == []
    with pytest.raises(IntegrityError):
        registry.read_bytes(v.ref, "file.bin")
    # A different size is caught too.
    registry.storage.put_bytes(v.key("file.bin"), data + b"!")
    with pytest.raises(IntegrityError):
        registry.download(v.ref, dest, progress=False)
    assert not dest.exists() or [p for p in dest.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------------------------- names, refs
@pytest.mark.parametrize(
    "bad", ["..", "a..b", "a/b", "Upper", "x" * 65, "", "-lead", ".hidden", "sp ace", "a\\b"]
)
def test_bad_names_rejected(registry, tmp_path, bad):
    with pytest.raises(RegistryError):
        validate_name(bad)
    src = _write(tmp_path / "f.txt", b"x")
    with pytest.raises(RegistryError):
        registry.create("dataset", bad, src, progress=False)
    with pytest.raises(RegistryError):
        registry.create(bad, "fine", src, progress=False)
    assert registry.kinds() == []  # nothing was written


def test_good_names_accepted():
    for good in ["a", "x" * 64, "reflade-demo", "sd3.5_medium", "0abc"]:
        assert validate_name(good) == good


def test_bad_aliases_rejected(registry, tmp_path):
    v = _one_file_version(registry, tmp_path, "model", "aliased", b"m")
    for bad in ["123", "7", "Prod", "a/b", "..", ""]:
        with pytest.raises(RegistryError):
            validate_alias(bad)
        with pytest.raises(RegistryError):
            registry.set_alias(v.ref, bad)
    with pytest.raises(RegistryError, match="latest"):
        registry.set_alias(v.ref, "latest")
    assert registry.aliases("model", "aliased") == {"latest": 1}
    assert validate_alias("v2") == "v2"


def test_bad_file_paths_rejected(registry, tmp_path):
    src = _write(tmp_path / "f.txt", b"x")
    for bad in ["../escape.txt", "/abs.txt", "a//b.txt", "./a.txt"]:
        with pytest.raises(RegistryError):
            registry.create("dataset", "paths", files={bad: src}, progress=False)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model/reflayer@production", Ref("model", "reflayer", None, "production", None)),
        ("dataset/reflade-demo@3:test", Ref("dataset", "reflade-demo", 3, None, "test")),
        ("weights/sd3-medium@1", Ref("weights", "sd3-medium", 1, None, None)),
        ("model/reflayer", Ref("model", "reflayer", None, "latest", None)),
        ("dataset/reflade-demo:train", Ref("dataset", "reflade-demo", None, "latest", "train")),
        ("model/reflayer@latest", Ref("model", "reflayer", None, "latest", None)),
    ],
)
def test_reference_parsing(text, expected):
    assert Ref.parse(text) == expected


def test_reference_str_round_trips():
    for text in ["model/reflayer@production", "dataset/reflade-demo@3:test", "model/reflayer"]:
        assert str(Ref.parse(text)) == text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "model",
        "model/",
        "/reflayer",
        "Model/reflayer",
        "model/Reflayer",
        "model/a/b",
        "model/x@",
        "model/x@0",
        "model/x@Prod",
        "model/x:",
        "model/..@1",
        "model/x@1:Test",
        "model/x@1@2",
        "model/" + "x" * 65,
    ],
)
def test_invalid_references(bad):
    with pytest.raises(RegistryError):
        Ref.parse(bad)


def test_latest_is_the_highest_version(registry, tmp_path):
    for i in range(3):
        _one_file_version(registry, tmp_path, "dataset", "lat", f"v{i}".encode())
    registry.set_alias("dataset/lat@1", "production")
    assert registry.resolve("dataset/lat").version == 3
    assert registry.resolve("dataset/lat@latest").version == 3
    assert registry.resolve("dataset/lat@production").version == 1
    assert registry.aliases("dataset", "lat") == {"latest": 3, "production": 1}
    v = registry.resolve("dataset/lat@2:test")
    assert (v.version, v.split) == (2, "test")
    assert registry.read_bytes(v, "file.bin") == b"v1"


def test_unknown_alias_lists_known_ones(registry, tmp_path):
    _one_file_version(registry, tmp_path, "model", "m", b"1")
    _one_file_version(registry, tmp_path, "model", "m", b"2")
    registry.set_alias("model/m@1", "production")
    registry.set_alias("model/m@2", "candidate")
    with pytest.raises(RegistryError) as e:
        registry.resolve("model/m@staging")
    msg = str(e.value)
    assert "staging" in msg
    for known in ("candidate", "latest", "production"):
        assert known in msg


def test_unknown_version_and_name_errors(registry, tmp_path):
    _one_file_version(registry, tmp_path, "model", "known", b"1")
    with pytest.raises(RegistryError, match="no version 9"):
        registry.resolve("model/known@9")
    with pytest.raises(RegistryError) as e:
        registry.resolve("model/unknwn")
    assert "known" in str(e.value)  # names the names that exist
    with pytest.raises(RegistryError):
        registry.read_bytes("model/known@1", "missing.bin")


# ---------------------------------------------------------------------------------------------- lineage
def test_lineage_both_ways(registry, tmp_path):
    ds = _one_file_version(registry, tmp_path, "dataset", "reflade-demo", b"data")
    model = _one_file_version(
        registry, tmp_path, "model", "reflayer", b"model", parents=["dataset/reflade-demo"]
    )
    report = _one_file_version(
        registry, tmp_path, "eval-report", "hpa", b"report", parents=["model/reflayer@1"]
    )
    assert model.parents == [ds.ref] == ["dataset/reflade-demo@1"]
    assert report.parents == ["model/reflayer@1"]
    assert registry.children("dataset/reflade-demo@1") == ["model/reflayer@1"]
    assert registry.children("model/reflayer") == ["eval-report/hpa@1"]
    assert registry.children("eval-report/hpa@1") == []

    up = registry.lineage("eval-report/hpa@1")
    assert up["ref"] == "eval-report/hpa@1"
    assert [p["ref"] for p in up["parents"]] == ["model/reflayer@1"]
    assert [g["ref"] for g in up["parents"][0]["parents"]] == ["dataset/reflade-demo@1"]
    assert up["children"] == []

    down = registry.lineage("dataset/reflade-demo@1")
    assert [c["ref"] for c in down["children"]] == ["model/reflayer@1"]
    assert [g["ref"] for g in down["children"][0]["children"]] == ["eval-report/hpa@1"]
    assert down["parents"] == []
    # lineage edges are not listed as a kind
    assert registry.kinds() == ["dataset", "eval-report", "model"]


def test_unknown_parent_is_rejected(registry, tmp_path):
    with pytest.raises(RegistryError):
        _one_file_version(registry, tmp_path, "model", "orphan", b"m", parents=["dataset/nope@1"])
    assert registry.versions("model", "orphan") == []


# ---------------------------------------------------------------------------------------------- gc
def test_gc_removes_orphans_of_an_interrupted_import(registry, tmp_path):
    storage = registry.storage
    data = {"a.bin": os.urandom(3000), "sub/b.bin": os.urandom(2000)}
    src = tmp_path / "src"
    for rel, body in data.items():
        _write(src / rel, body)
    v = registry.create("dataset", "gcd", src, progress=False)
    # An import that died after uploading its files and before creating its manifest.
    base = f"{registry.prefix}dataset/gcd/"
    orphan_keys = [
        f"{base}objects/20240101T000000-deadbeef0000/x",
        f"{base}objects/20240101T000000-deadbeef0000/y/z",
    ]
    for k in orphan_keys:
        storage.put_bytes(k, b"orphan bytes")

    young = registry.gc(dry_run=False, grace_s=3600)
    assert young.orphans == [] and young.kept_young == 2 and not young.deleted
    assert all(storage.exists(k) for k in orphan_keys)

    dry = registry.gc(grace_s=0)
    assert sorted(o["key"] for o in dry.orphans) == sorted(orphan_keys)
    assert dry.bytes == 2 * len(b"orphan bytes")
    assert not dry.deleted
    assert all(storage.exists(k) for k in orphan_keys)

    real = registry.gc(dry_run=False, grace_s=0)
    assert sorted(o["key"] for o in real.orphans) == sorted(orphan_keys)
    assert real.deleted
    assert not any(storage.exists(k) for k in orphan_keys)
    # The version is intact.
    assert registry.versions("dataset", "gcd") == [1]
    assert _tree(registry.download(v.ref, tmp_path / "out", progress=False)) == data
    assert registry.gc(grace_s=0).orphans == []


# ---------------------------------------------------------------------------------------------- URIs
def test_uris_are_readable(registry, tmp_path):
    src = tmp_path / "shards"
    files = {"train/0.parquet": os.urandom(100), "train/1.parquet": os.urandom(200)}
    for rel, body in files.items():
        _write(src / rel, body)
    registry.create("dataset", "uris", src, progress=False)
    uris = registry.uris("dataset/uris@1:train")
    assert len(uris) == 2
    storage = registry.storage
    got = {}
    for uri in uris:
        assert uri.startswith(f"s3://{storage.bucket}/{registry.prefix}dataset/uris/objects/")
        got[uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[-1]] = storage.get_bytes(storage.key_of(uri))[0]
        with storage.fs.open_input_stream(uri.removeprefix("s3://")) as f:
            assert f.read() == got[uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[-1]]
    assert got == files


def test_latest_is_right_whatever_the_hint_says(registry, tmp_path):
    """The latest-hint only says where listing starts: stale, missing, garbage or too-high hints never give
    a wrong `latest`."""
    for i in range(5):
        f = tmp_path / f"v{i}.txt"
        f.write_text(f"content {i}")
        registry.create("dataset", "hinted", f)
    hint_key = registry._base("dataset", "hinted") + "latest-hint.json"
    storage = registry.storage
    for hint in ({"version": 2}, {"version": 1}, {"version": 99}, {"nonsense": True}, "garbage"):
        storage.put_json(hint_key, hint)
        assert registry.resolve("dataset/hinted").version == 5, hint
        assert registry.aliases("dataset", "hinted")["latest"] == 5
    storage.delete([hint_key])
    assert registry.resolve("dataset/hinted").version == 5
    f = tmp_path / "v5.txt"
    f.write_text("content 5")
    registry.create("dataset", "hinted", f)
    assert registry.resolve("dataset/hinted").version == 6
    assert storage.get_json(hint_key)[0] == {"version": 6}


def test_interrupted_import_leaves_no_version(registry, tmp_path, monkeypatch):
    """An import cut off mid-upload (Ctrl-C here) registers nothing; gc finds what it uploaded."""
    src = tmp_path / "src"
    for i in range(5):
        _write(src / f"f{i}.bin", os.urandom(1000 + i))
    real_put = registry.storage.put_bytes
    calls = 0

    def cut_after_two(key, data, **kw):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_put(key, data, **kw)

    monkeypatch.setattr(registry.storage, "put_bytes", cut_after_two)
    with pytest.raises(KeyboardInterrupt):
        registry.create("dataset", "cut", src, progress=False)
    monkeypatch.undo()

    assert registry.versions("dataset", "cut") == []
    with pytest.raises(RegistryError, match="has no versions"):
        registry.resolve("dataset/cut")
    assert len(registry.gc(grace_s=0).orphans) == 2
    v = registry.create("dataset", "cut", src, progress=False)
    assert v.version == 1 and not v.reused and len(v.files) == 5
    registry.gc(dry_run=False, grace_s=0)
    assert _tree(registry.download(v.ref, tmp_path / "out", progress=False)) == _tree(src)
