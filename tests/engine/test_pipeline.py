"""The engine run end to end on Ray Data against the real SeaweedFS: bundled photos, synthetic scenes and hostile
files in, a validated dataset version out; counts balance; re-runs are idempotent; a run killed halfway resumes
without duplicates; a Ray worker killed mid-run loses nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from reflade.engine.pipeline import run_engine
from reflade.engine.schema import decode_mask, load_rows, validate_row
from reflade.engine.synth import make_scene, scene_to_png_bytes
from reflade.platform.registry import Registry, RegistryError

pytestmark = pytest.mark.timeout(900)


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array, quality=92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_input(folder: Path, n_synthetic: int = 6, hostile: bool = True) -> dict[str, str]:
    """A folder as a user would drop it; returns {file name: what the engine should do with it}."""
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    for name in ("astronaut", "coffee", "chelsea"):
        (folder / f"{name}.png").write_bytes(_png(getattr(skimage.data, name)()))
        expect[f"{name}.png"] = "photo"
    for i in range(n_synthetic):
        (folder / f"scene{i:02d}.png").write_bytes(scene_to_png_bytes(make_scene(seed=500 + i)))
        expect[f"scene{i:02d}.png"] = "photo"
    if hostile:
        (folder / "copy_of_coffee.png").write_bytes((folder / "coffee.png").read_bytes())
        expect["copy_of_coffee.png"] = "duplicate_of"
        (folder / "astronaut_again.jpg").write_bytes(_jpeg(skimage.data.astronaut(), 70))
        expect["astronaut_again.jpg"] = "duplicate_of"
        # Later in input order than chelsea.png but a larger file, so the engine processes it first (largest
        # first): near-duplicates must still be resolved in input order, keeping chelsea.png.
        chelsea = Image.fromarray(skimage.data.chelsea())
        big = chelsea.resize((chelsea.width * 2, chelsea.height * 2), Image.BICUBIC)
        (folder / "chelsea_big.png").write_bytes(_png(np.asarray(big)))
        expect["chelsea_big.png"] = "duplicate_of"
        (folder / "notes.jpg").write_text("this is not a picture")
        expect["notes.jpg"] = "not_an_image"
        (folder / "empty.png").write_bytes(b"")
        expect["empty.png"] = "empty"
        (folder / "truncated.jpg").write_bytes(_jpeg(skimage.data.chelsea())[:3000])
        expect["truncated.jpg"] = "truncated"
        (folder / "gray.png").write_bytes(_png(skimage.data.camera()))
        expect["gray.png"] = "grayscale"
        (folder / "sub").mkdir()
        (folder / "sub" / "tiny.png").write_bytes(_png(np.zeros((1, 1, 3), np.uint8)))
        expect["sub/tiny.png"] = "too_small"
    return expect


def _quarantine(registry: Registry, ref: str) -> list[dict]:
    import pyarrow.parquet as pq

    v = registry.resolve(ref)
    data = registry.read_bytes(v, "quarantine.parquet")
    return pq.read_table(io.BytesIO(data)).to_pylist()


def test_engine_run_end_to_end(engine_cfg, registry, ray_cluster, tmp_path):
    expect = make_input(tmp_path / "in")
    res = run_engine(
        engine_cfg, str(tmp_path / "in"), "e2e", synthetic=2, progress=False, log=lambda *_: None
    )
    assert res.images_in == len(expect) + 2
    assert res.images_kept + res.images_quarantined == res.images_in
    assert res.layers_kept + res.layers_rejected == res.layers_out
    assert res.layers_kept > 0 and res.synthetic_rows > 0

    rows = load_rows(registry, res.dataset)
    assert len(rows) == res.layers_kept
    assert len({r["sample_id"] for r in rows}) == len(rows)
    for r in rows:
        validate_row(r, decode=True)
        if r["kind"] == "foreground":
            vis = decode_mask(r["visible_mask"])
            for p in r["prompts"]:
                for x, y, label in p["points"]:
                    assert vis[y, x] == bool(label), (r["sample_id"], p["type"])
    assert {r["kind"] for r in rows} == {"foreground", "background"}
    assert {r["split"] for r in rows} <= {"train", "test"}

    q = _quarantine(registry, res.dataset)
    by_name = {r["name"]: r for r in q if r["entity_id"] is None}
    for name, what in expect.items():
        if what == "photo":
            continue
        assert name in by_name, f"{name} was not quarantined"
        assert by_name[name]["reason_code"] == what, (name, by_name[name]["reason"])
    kept_chelsea = hashlib.sha256((tmp_path / "in" / "chelsea.png").read_bytes()).hexdigest()[:16]
    assert kept_chelsea in by_name["chelsea_big.png"]["reason"], by_name["chelsea_big.png"]["reason"]
    assert "chelsea.png" not in by_name

    # Lineage: the dataset was built from the registered input manifest.
    v = registry.resolve(res.dataset)
    assert any(p.startswith("raw-manifest/e2e-input@") for p in v.parents)
    assert res.dataset in registry.children(v.parents[0])
    assert v.metrics["images_in"] == res.images_in

    # The same command again: nothing uploaded, nothing redone, the same version.
    again = run_engine(
        engine_cfg, str(tmp_path / "in"), "e2e", synthetic=2, progress=False, log=lambda *_: None
    )
    assert again.uploaded == 0 and again.reused and again.dataset == res.dataset
    assert again.skipped_done == len(expect) - 1  # the exact copy is one source


def _sample_ids(registry, ref) -> set[str]:
    return {r["sample_id"] for r in load_rows(registry, ref)}


def test_killed_run_resumes_without_duplicates(engine_cfg, registry, ray_cluster, cli_env, tmp_path):
    make_input(tmp_path / "in", n_synthetic=10, hostile=False)
    clean = run_engine(engine_cfg, str(tmp_path / "in"), "clean", progress=False, log=lambda *_: None)

    env = cli_env(registry, tmp_path / "home", REFLADE_ENGINE_BATCH_SIZE="1", REFLADE_RAY_NUM_CPUS="2")
    cmd = [
        str(Path(sys.executable).parent / "reflade"),
        "engine",
        "run",
        "--input",
        str(tmp_path / "in"),
        "--dataset",
        "killed",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    storage = registry.storage
    deadline = time.monotonic() + 300
    markers = []
    while time.monotonic() < deadline and proc.poll() is None:
        markers = list(storage.list("runs/engine/killed/"))
        markers = [m for m in markers if "/done/" in m["Key"]]
        if len(markers) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run finished before it could be killed:\n{proc.stdout.read().decode()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    staged_before = len([m for m in storage.list("runs/engine/killed/") if "/done/" in m["Key"]])
    assert 2 <= staged_before < 13
    with pytest.raises(RegistryError, match="has no versions"):  # nothing registered by the killed run
        registry.resolve("dataset/killed")

    resumed = run_engine(engine_cfg, str(tmp_path / "in"), "killed", progress=False, log=lambda *_: None)
    assert resumed.skipped_done >= staged_before
    assert _sample_ids(registry, resumed.dataset) == _sample_ids(registry, clean.dataset)
    assert resumed.layers_kept == clean.layers_kept


def test_worker_killed_mid_run_loses_nothing(engine_cfg, registry, ray_cluster, tmp_path):
    import psutil

    make_input(tmp_path / "in", n_synthetic=10, hostile=False)
    # The clean run in the staged layout, the killed one in the default (fused, on a CPU cluster): the layout
    # is a resource choice, so both give the same samples.
    eng = engine_cfg.section("engine")
    eng.layout = "staged"
    clean = run_engine(engine_cfg, str(tmp_path / "in"), "w-clean", progress=False, log=lambda *_: None)
    eng.layout = "auto"
    eng.batch_size = 1
    killed = []

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray::" in cmd and "LayerStages" in cmd:  # an actor of the fused stages 2-6
                    done = [m for m in registry.storage.list("runs/engine/w-kill/") if "/done/" in m["Key"]]
                    if done:
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(cmd)
                        return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_engine(engine_cfg, str(tmp_path / "in"), "w-kill", progress=False, log=lambda *_: None)
    t.join(timeout=5)
    assert killed, "no fused-stages actor was found to kill"
    assert _sample_ids(registry, res.dataset) == _sample_ids(registry, clean.dataset)
    stats = json.loads(registry.read_bytes(registry.resolve(res.dataset), "stats.json"))
    assert stats["layers_kept"] == clean.layers_kept


def test_neural_backends_end_to_end(engine_cfg, registry, ray_cluster, tmp_path):
    """Tiny random-init SAM + OWLv2 + BLIP captioner + RePaint, loaded from the registry by the Ray actors,
    through every stage."""
    from reflade.engine.backends.tiny_weights import register_tiny_weights
    from reflade.engine.stages.prompts import MAX_TEXT_CHARS

    refs = register_tiny_weights(registry)
    eng = engine_cfg.section("engine")
    eng.weights_cache = str(tmp_path / "cache")
    eng.layout = "staged"  # what auto picks for neural backends, said explicitly
    make_input(tmp_path / "in", n_synthetic=3, hostile=False)
    res = run_engine(
        engine_cfg, str(tmp_path / "in"), "neural", backends="neural", progress=False, log=lambda *_: None
    )
    assert res.images_kept + res.images_quarantined == res.images_in
    assert res.layers_kept > 0
    rows = load_rows(registry, res.dataset)
    captioned = 0
    for r in rows:
        validate_row(r, decode=True)
        assert r["provenance"]["backends"]["scene"] == "neural"
        assert r["provenance"]["backends"]["captioner"] == "neural"
        assert sorted(r["provenance"]["weights"]) == sorted(refs.values())
        assert refs["tiny-blip"] in r["provenance"]["weights"]
        texts = {(p["type"], p["granularity"]): p["text"] for p in r["prompts"] if "text" in p["type"]}
        assert {g for _, g in texts} == {"coarse", "fine"}
        for text in texts.values():
            assert text and len(text) <= MAX_TEXT_CHARS and text.isascii() and text.isprintable()
        assert r["scores"]["caption_used"] in (0.0, 1.0)
        captioned += r["scores"]["caption_used"] == 1.0
    assert captioned, "no row took its fine text from the captioner"
    # Lineage to every weights version used, the captioner's included.
    v = registry.resolve(res.dataset)
    assert set(refs.values()) <= set(v.parents) and refs["tiny-blip"] in v.parents
    for ref in refs.values():
        assert res.dataset in registry.children(ref)


def test_malformed_manifest_records_are_quarantined(engine_cfg, registry, storage, ray_cluster, tmp_path):
    keys = []
    for i in range(2):
        keys.append(f"{registry.prefix}inputs/scene{i}.png")
        storage.put_bytes(keys[-1], scene_to_png_bytes(make_scene(seed=700 + i)))
    sha1 = hashlib.sha256(storage.get_bytes(keys[1])[0]).hexdigest()
    records = [
        {"key": keys[0], "name": "computed"},
        {"key": keys[1], "name": "given", "sha256": sha1},
        {"key": keys[1], "name": "traversal", "sha256": "../../etc/passwd"},
        {"key": keys[0], "name": "not-hex", "sha256": "zz" * 32},
    ]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(records))
    res = run_engine(engine_cfg, str(manifest), "hostile-manifest", progress=False, log=lambda *_: None)
    # Counted as images in and quarantined (the engine's own balance check passed), the run registered.
    assert res.images_in == 4 and res.images_kept == 2 and res.images_quarantined == 2
    assert res.layers_kept > 0 and res.quarantine_reasons == {"ingest:bad_sha256": 2}
    by_name = {r["name"]: r for r in _quarantine(registry, res.dataset)}
    assert by_name["traversal"]["reason"] == (
        "bad_sha256: '../../etc/passwd' is not 64 hex digits (manifest record 2)"
    )
    assert by_name["not-hex"]["stage"] == "ingest" and by_name["not-hex"]["reason_code"] == "bad_sha256"
