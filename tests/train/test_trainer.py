"""RefLayer training under Ray Train: registration and lineage, two-rank DDP (ranks agree, as the metrics report),
checkpoint/resume, and workers killed from outside (SIGKILL) between checkpoints and during an upload.

All runs are tiny (64 px, a handful of steps) on the session's local 2-CPU Ray cluster, with 0.5 CPU per worker
so Ray Data's read tasks keep room (design.md, Pitfalls).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import load_rows, write_shard
from reflade.engine.synth import make_scene
from reflade.platform.config import load_config
from reflade.train.config import TrainSettings
from reflade.train.plain_loop import train_plain
from reflade.train.preprocess import preprocess_row
from reflade.train.trainer import run_training

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _tiny_vae():
    try:
        from reflade.train.vae import build_tiny_vae

        return build_tiny_vae(64, seed=0)
    except ImportError:  # the VAE module not there yet: a random AutoencoderKL of the same layout
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 64),
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )


@pytest.fixture
def world(registry, storage_config, tmp_path):
    """A registered 8-ish-row dataset (2 scenes, train split), a registered tiny VAE and a config for both."""
    rows = []
    for seed in (1, 2):
        rows += synthetic_rows(
            make_scene(seed, size=(64, 64), n_objects=(2, 2)), f"s{seed}", "cfg", "train", EngineConfig()
        )
    (tmp_path / "ds" / "shards").mkdir(parents=True)
    write_shard(rows, str(tmp_path / "ds" / "shards" / "part-0.parquet"))
    dataset = registry.create("dataset", "train-src", tmp_path / "ds", progress=False)
    vae_dir = tmp_path / "vae"
    _tiny_vae().save_pretrained(vae_dir, safe_serialization=True)
    vae = registry.create("weights", "tiny-vae", vae_dir, progress=False)
    cfg = load_config(
        env={
            "REFLADE_STORAGE_ENDPOINT": storage_config.endpoint,
            "REFLADE_STORAGE_BUCKET": storage_config.bucket,
            "AWS_ACCESS_KEY_ID": storage_config.access_key_id,
            "AWS_SECRET_ACCESS_KEY": storage_config.secret_access_key,
            "REFLADE_REGISTRY_PREFIX": registry.prefix.rstrip("/"),
        }
    )
    return {
        "cfg": cfg,
        "dataset": dataset.ref,
        "vae": vae.ref,
        "n_rows": len(rows),
        "cache": tmp_path / "cache",
        "tmp": tmp_path,
    }


CKPT_EVERY = 8
"""Steps between checkpoints in the killed-worker test: long enough that Ray Train records a checkpoint (its
controller collects reports every 2 s) before the next one starts."""


def _settings(**kw) -> TrainSettings:
    base = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=3, report_every=1, seed=0)
    base.update(kw)
    return TrainSettings(**base)


def test_settings_validate():
    with pytest.raises(ValueError, match="phase"):
        TrainSettings(phase="nope")
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="lion")
    assert TrainSettings().cpus_per_worker == 0.5


def test_preprocess_row_shapes(world, registry):
    row = load_rows(registry, world["dataset"], "train")[0]
    out = preprocess_row(row, 32)
    assert out["image"].shape == (3, 32, 32) and out["canvas"].shape == (3, 32, 32)
    assert out["layer"].shape == (4, 32, 32)
    assert 0.0 <= out["layer"].min() and out["layer"].max() <= 1.0
    assert -1.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert isinstance(out["text"], str)
    again = preprocess_row(row, 32)
    assert np.array_equal(out["canvas"], again["canvas"]) and out["text"] == again["text"]


def test_run_training_registers_candidate_with_lineage(world, registry):
    v = run_training(
        world["cfg"],
        world["dataset"],
        _settings(phase="both", ema_decay=0.9, grad_accum=2),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        log=None,
    )
    assert v.ref == "model/reflayer@1"
    assert registry.aliases("model", "reflayer")["candidate"] == 1
    assert world["dataset"] in v.parents and world["vae"] in v.parents
    assert v.metrics["steps"] == 3 and np.isfinite(v.metrics["loss"]) and v.metrics["samples_per_s"] > 0
    # 3 steps x 2 micro-batches x 4 rows is more than the split's rows: later epochs replayed the first from memory.
    assert world["n_rows"] < 24 and v.metrics["shard_reads"] == 1
    assert v.metadata["settings"]["phase"] == "both" and v.metadata["weights"] == "ema"
    assert any(f["path"] == "bundle.json" for f in v.files)
    # The plain loop shares the step function and runs on the same inputs.
    from reflade.train.model import build_reflayer

    bundle = build_reflayer("tiny", vae=world["vae"], registry=registry, cache_dir=world["cache"])
    rows = [preprocess_row(r, 64) for r in load_rows(registry, world["dataset"], "train")[:4]]
    batch = {
        k: np.stack([r[k] for r in rows]) if k != "text" else np.array([r[k] for r in rows]) for k in rows[0]
    }
    m = train_plain(bundle, [batch], _settings(steps=2))
    assert m["steps"] == 2 and m["samples"] == 8 and all(np.isfinite(m["losses"]))


def test_two_worker_ddp_ranks_agree(world):
    v = run_training(
        world["cfg"],
        world["dataset"],
        # 4 steps: each rank's half of the split is 2 batches of 2, so the ranks agree on replaying at step 3.
        _settings(steps=4, workers=2, batch_size=2, checkpoint_every=4),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        log=None,
    )
    m = (
        v.result.metrics
    )  # rank 0's last report: every rank's weights fingerprint gathered after the last step
    assert m["step"] == 4 and m["world_size"] == 2 and v.metrics["steps"] == 4
    assert world["n_rows"] <= 8 and m["shard_reads"] == 1
    per_rank = m["param_checksum_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == m["param_checksum"]
    assert per_rank[1] == pytest.approx(per_rank[0], rel=1e-12, abs=1e-9)


class ThrottlingProxy:
    """A TCP proxy in front of the object store whose client-to-server direction the test can slow down.

    Training runs with this proxy as its endpoint: while ``rate`` is set, every upload (a checkpoint's
    ``state.pt``) crawls at ``rate`` bytes/s per connection, so the test can kill a worker while an asynchronous
    checkpoint upload is in flight, with nothing in the product changed. ``upstream_bytes`` counts what clients
    sent (an upload under way shows there).
    """

    def __init__(self, endpoint: str):
        target = urlparse(endpoint)
        self.target = (target.hostname, target.port)
        self.rate: float | None = None
        self.upstream_bytes = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                rate = self.rate if up else None
                data = src.recv(4096 if rate else 65536)
                if not data:
                    break
                if up:
                    with self._lock:
                        self.upstream_bytes += len(data)
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()


def _wait(what: str, condition, timeout: float = 240.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _train_worker_pids() -> list[int]:
    """Processes of this test session's Ray cluster (children of this process) running a Ray Train worker."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def _kill_train_worker() -> int:
    (pid,) = _wait("one Ray Train worker process", _train_worker_pids, timeout=60)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_checkpoint_resume_and_killed_worker(world, storage_config, registry):
    """A worker killed from outside (SIGKILL) once between checkpoints and once while an asynchronous checkpoint
    upload is in flight: each time Ray Train restarts the group from the last durable checkpoint (the one its
    checkpoint manager recorded in the run folder), the loss continues the curve and the step count is exact."""
    k, n = CKPT_EVERY, 3 * CKPT_EVERY
    proxy = ThrottlingProxy(storage_config.endpoint)
    cfg = load_config(
        env={
            "REFLADE_STORAGE_ENDPOINT": proxy.endpoint,
            "REFLADE_STORAGE_BUCKET": storage_config.bucket,
            "AWS_ACCESS_KEY_ID": storage_config.access_key_id,
            "AWS_SECRET_ACCESS_KEY": storage_config.secret_access_key,
            "REFLADE_REGISTRY_PREFIX": registry.prefix.rstrip("/"),
        }
    )
    run = "kill-test-" + world["tmp"].name[-8:]
    snapshot_key = f"runs/train/{run}/checkpoint_manager_snapshot.json"
    metrics_file = world["tmp"] / "metrics.jsonl"

    def lines() -> list[dict]:
        if not metrics_file.exists():
            return []
        return [json.loads(x) for x in metrics_file.read_text().splitlines() if x.endswith("}")]

    def durable_step() -> int:
        """The step of the latest checkpoint Ray Train's checkpoint manager recorded (0: none)."""
        if not registry.storage.exists(snapshot_key):
            return 0
        snap, _ = registry.storage.get_json(snapshot_key)
        latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
        return int(latest[len("checkpoint-") :].split("-")[0]) if latest else 0

    outcome: dict = {}

    def train() -> None:
        try:
            outcome["version"] = run_training(
                cfg,
                world["dataset"],
                # Epochs streamed every time (no replay from memory): each of this 2-batch split's epochs restarts
                # Ray Data's read (about a second), which paces the steps so that the kill below lands between
                # checkpoint k and the next one; replayed, 8 steps take well under Ray Train's 2 s poll.
                _settings(steps=n, checkpoint_every=k, lr=1e-3, replay_mib=0),
                vae_ref=world["vae"],
                cache_dir=world["cache"],
                run_name=run,
                torch_threads=1,
                metrics_jsonl=metrics_file,
                log=None,
            )
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    try:
        # 1. Between checkpoints: checkpoint k is durable, the worker is past it, no upload is in flight.
        _wait(f"checkpoint {k} recorded", lambda: durable_step() == k or "error" in outcome)
        if "error" in outcome:
            raise outcome["error"]
        _kill_train_worker()

        # 2. In flight: from now on uploads crawl; once the restarted group reaches 2k, its checkpoint upload is
        # under way (bytes flowing through the proxy) but cannot finish before the kill.
        proxy.rate = 64 * 1024
        line = _wait(
            f"the restarted run's checkpoint at step {2 * k}",
            lambda: (
                next((x for x in lines() if x["resumed_from"] == k and x["step"] == 2 * k), None)
                or "error" in outcome
            ),
        )
        if "error" in outcome:
            raise outcome["error"]
        assert line["checkpoint"], line
        sent = proxy.upstream_bytes
        _wait("the checkpoint upload under way", lambda: proxy.upstream_bytes - sent > 256 * 1024)
        assert durable_step() == k
        _kill_train_worker()
        proxy.rate = None

        thread.join(timeout=600)
        assert not thread.is_alive(), "training did not finish"
    finally:
        proxy.rate = None
    if "error" in outcome:
        raise outcome["error"]
    v1 = outcome["version"]
    proxy.close()  # (left open on a failure: the training thread may still be using it)

    # Three attempts: from scratch, from k, and (the in-flight checkpoint never became durable) from k again.
    attempts: list[list[dict]] = []
    for x in lines():
        prev = attempts[-1][-1] if attempts else None
        if prev is None or x["resumed_from"] != prev["resumed_from"] or x["step"] <= prev["step"]:
            attempts.append([])
        attempts[-1].append(x)
    assert [a[0]["resumed_from"] for a in attempts] == [0, k, k], [(a[0], a[-1]) for a in attempts]
    first, middle, last = attempts
    # Step counts are exact: every attempt starts right after its checkpoint, and the last one ends at n.
    assert [x["step"] for x in middle][:k] == list(range(k + 1, 2 * k + 1))
    assert [x["step"] for x in last] == list(range(k + 1, n + 1))
    # The first attempt was killed after checkpoint k became durable, before the next one was due.
    assert [x["step"] for x in first] == list(range(1, len(first) + 1)) and k <= len(first) < 2 * k
    assert first[-1]["shard_reads"] > 1  # streamed epochs, as set above
    assert (
        v1.metrics["steps"] == n and v1.result.metrics["step"] == n and v1.result.metrics["resumed_from"] == k
    )
    # The loss continues the curve: the resumed run starts near where the first left off at k, far below the
    # initial loss.
    initial = np.mean([x["loss"] for x in first[:3]])
    before = np.mean([x["loss"] for x in first[k - 3 : k]])
    resumed = np.mean([x["loss"] for x in last[:3]])
    assert resumed < initial - 0.1, (initial, before, resumed)
    assert abs(resumed - before) < 0.15, (initial, before, resumed)

    # Resume the same run name with more steps: the step counter continues from n.
    v2 = run_training(
        world["cfg"],
        world["dataset"],
        _settings(steps=n + 2, checkpoint_every=k),
        vae_ref=world["vae"],
        cache_dir=world["cache"],
        run_name=run,
        resume=True,
        log=None,
    )
    m = v2.result.metrics
    assert m["resumed_from"] == n and m["step"] == n + 2 and np.isfinite(m["loss"])
    assert v2.metrics["steps"] == n + 2 and v2.ref == "model/reflayer@2"
    with pytest.raises(ValueError, match="resume"):
        run_training(
            world["cfg"], world["dataset"], _settings(), vae_ref=world["vae"], run_name=run, log=None
        )
