"""Two ways a run meets the world while it works: a second `engine run` driver on the same dataset at the same
time, and an actor of the staged layout's matting pool killed from outside while it holds a batch. Either way the
committed data must hold every sample of an undisturbed run, once.

The contract for two drivers, from the code: both plan the same run (the run id hashes the dataset, the input and
the configuration), so they stage into the same prefix under the same shard names (a batch's name hashes its
sources) and a source staged by both is committed once; each commits from the markers it sees. Both commits are
registry writes of a content-hashed version: identical content gives one version (the second is told it reuses
it), different bytes (the stage timings in ``stats.json`` come from whichever driver wrote a marker last) give two
versions, numbered by conditional creates, never one overwritten. So: both finish, one or two versions, and every
version holds exactly the undisturbed run's samples, each once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_pipeline import make_input

from reflade.engine.pipeline import run_engine
from reflade.engine.schema import load_rows

pytestmark = pytest.mark.timeout(900)


def _samples(registry, ref) -> dict[str, bytes]:
    rows = load_rows(registry, ref)
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{ref} holds a sample twice"
    return {r["sample_id"]: r["layer"] for r in rows}


def test_two_drivers_on_the_same_dataset_at_once(engine_cfg, registry, ray_cluster, cli_env, tmp_path):
    make_input(tmp_path / "in", n_synthetic=8, hostile=False)
    eng = engine_cfg.section("engine")
    eng.batch_size, eng.fused_actors = 1, 1
    clean = run_engine(engine_cfg, str(tmp_path / "in"), "race-clean", progress=False, log=lambda *_: None)
    expected = _samples(registry, clean.dataset)

    env = cli_env(
        registry,
        tmp_path / "home",
        REFLADE_ENGINE_BATCH_SIZE="1",
        # Two drivers share the suite's 2 CPUs: one fused actor (0.5 CPU) each leaves room for their tasks.
        REFLADE_ENGINE_FUSED_ACTORS="1",
        RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,  # both on one cluster, as jobs would be
    )
    cmd = [
        str(Path(sys.executable).parent / "reflade"),
        "engine",
        "run",
        "-i",
        str(tmp_path / "in"),
        "-d",
        "race",
    ]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    lines: list[list[tuple[float, str]]] = [[], []]

    def read(i: int) -> None:
        for line in procs[i].stdout:
            lines[i].append((time.monotonic(), line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
    for t in readers:
        t.start()
    for p in procs:
        p.wait(timeout=600)
    for t in readers:
        t.join(timeout=10)
    text = ["\n".join(line for _, line in out) for out in lines]
    assert [p.returncode for p in procs] == [0, 0], text

    # Both were at work at once: each had planned the run before either committed.
    planned = [min(t for t, line in out if re.match(r"run [0-9a-f]{16}", line)) for out in lines]
    committed = [
        min(t for t, line in out if line.startswith(("registered dataset/", "reused dataset/")))
        for out in lines
    ]
    assert max(planned) < min(committed), text
    run_ids = {re.search(r"run ([0-9a-f]{16})", t).group(1) for t in text}
    assert len(run_ids) == 1  # the same run, the same prefix

    versions = registry.versions("dataset", "race")
    assert 1 <= len(versions) <= 2, versions
    reported = {re.search(r"(?:registered|reused) (dataset/race@\d+)", t).group(1) for t in text}
    assert reported == {f"dataset/race@{v}" for v in versions}
    for v in versions:  # every version: the undisturbed run's samples, each once, the same layer bytes
        assert _samples(registry, f"dataset/race@{v}") == expected, v


def _matting_actors() -> list[dict]:
    """The live actors of the matting pool, from Ray's own actor table (GCS): Ray Data names a pool actor's
    class after its operator (``MapWorker(MapBatches(MattingStage))``, the process title says the same)."""
    import psutil
    import ray

    out = []
    for a in ray._private.state.actors().values():
        if a["State"] != "ALIVE" or not a["Pid"]:
            continue
        try:
            title = " ".join(psutil.Process(a["Pid"]).cmdline())
        except psutil.Error:
            continue
        if "MattingStage" in a["ActorClassName"] or "MattingStage" in title:
            out.append({**a, "title": title})
    return out


def test_matting_actor_killed_while_it_holds_a_batch(engine_cfg, registry, ray_cluster, tmp_path):
    import psutil

    make_input(tmp_path / "in", n_synthetic=10, hostile=False)
    eng = engine_cfg.section("engine")
    eng.layout, eng.batch_size = "staged", 1
    clean = run_engine(engine_cfg, str(tmp_path / "in"), "m-clean", progress=False, log=lambda *_: None)
    expected = _samples(registry, clean.dataset)

    killed: list[dict] = []
    seen: list[tuple[str, float]] = []
    done = threading.Event()

    def killer() -> None:
        while not done.is_set() and not killed:
            for a in _matting_actors():  # ALIVE: its constructor (imports, numba kernels) is done
                try:
                    busy = psutil.Process(a["Pid"]).cpu_percent(interval=0.3)
                except psutil.Error:
                    continue
                seen.append((a["title"], busy))
                # Busy: an idle pool actor uses no CPU; one that burns a good part of a (shared) core is
                # matting a batch.
                if busy > 25:
                    os.kill(a["Pid"], signal.SIGKILL)
                    killed.append(a)
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = run_engine(engine_cfg, str(tmp_path / "in"), "m-kill", progress=False, log=lambda *_: None)
    finally:
        done.set()
        t.join(timeout=5)
    assert killed, f"no busy matting actor was found to kill; seen: {seen[-10:]}"
    import ray

    # The actor that was killed came back (Ray Data's pools restart their actors and retry their tasks).
    after = ray._private.state.actors(killed[0]["ActorID"])
    assert after["NumRestarts"] >= 1, after
    assert _samples(registry, res.dataset) == expected
    assert res.layers_kept == clean.layers_kept and res.images_kept == clean.images_kept
