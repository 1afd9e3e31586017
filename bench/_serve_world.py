"""bench/serve.py's own stack and its Ray-free arm: an object store with a registry holding the tiny model and one
API token, the Serve application deployed from the product's ``build_app``, the in-process arm (c) through the
deployment's batched code path, and a poller of replica counts. Nothing of the caller's is used or changed."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _serve_load import latency_stats

BUCKET = "reflade-bench"


def start_world(root: Path) -> dict[str, Any]:
    """SeaweedFS on free ports with generated credentials (its location and a credentials file put in this process's
    environment, which Ray's workers inherit; the weights cache under ``root``), a registry under a fresh prefix
    holding the tiny RefLayer (random init, the product's tiny VAE and MiniLM text encoder) and one API token's hash.
    The caller stops ``server``."""
    from reflade.platform.config import load_config
    from reflade.platform.registry import Registry
    from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
    from reflade.platform.storage import write_credentials_file
    from reflade.serve.app import TOKEN_HASHES_KEY
    from reflade.serve.auth import new_token
    from reflade.train.model import build_reflayer
    from reflade.train.text import MiniLMTextEncoder, minilm_folder
    from reflade.train.vae import build_tiny_vae

    server = SeaweedServer(root / "seaweed" / "data", generate_credentials(), s3_port=find_free_base_port())
    server.start(timeout=60)
    try:
        server.create_bucket(BUCKET)
        write_credentials_file(root / "aws_credentials", server.credentials)
        where = {"REFLADE_STORAGE_ENDPOINT": server.endpoint, "REFLADE_STORAGE_BUCKET": BUCKET}
        os.environ.update(where, AWS_SHARED_CREDENTIALS_FILE=str(root / "aws_credentials"))
        os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # the replicas' weights cache: ours, removed after
        keys = {
            "AWS_ACCESS_KEY_ID": server.credentials.access_key_id,
            "AWS_SECRET_ACCESS_KEY": server.credentials.secret_access_key,
        }
        cfg = load_config(
            env={**where, **keys, "REFLADE_REGISTRY_PREFIX": f"bench-serve-{uuid.uuid4().hex[:8]}"}
        )
        registry = Registry.from_config(cfg)
        bundle = build_reflayer(
            "tiny", vae=build_tiny_vae(64, seed=0), text=MiniLMTextEncoder(minilm_folder()), seed=0
        )
        model = registry.create("model", "reflayer", bundle.save(root / "model"), progress=False).ref
        token, digest = new_token()
        registry.storage.put_json(
            f"{registry.prefix.rstrip('/')}/{TOKEN_HASHES_KEY}",
            {"tokens": [{"name": "bench", "hash": digest}]},
        )
    except BaseException:
        server.stop()
        raise
    return {"server": server, "cfg": cfg, "registry": registry, "model": model, "token": token}


def request_body(steps: int | None = None) -> dict[str, Any]:
    """The benchmark's request: a 64 x 64 synthetic scene (the tiny model's size), a box around its first object,
    ``foreground``, the JSON answer (so that the service's timings come back); the service's default model and
    steps unless ``steps`` is given; the seed is the service's to draw."""
    from reflade.engine.schema import encode_png
    from reflade.engine.synth import make_scene

    scene = make_scene(3, size=(64, 64), n_objects=(2, 2))
    body = {
        "image": base64.b64encode(encode_png(scene.image)).decode(),
        "prompt": {"box": [int(v) for v in scene.objects[0].box]},
        "kind": "foreground",
        "response": "json",
    }
    if steps is not None:
        body["steps"] = steps
    return body


def deploy(world: dict[str, Any], settings, port: int) -> float:
    """Deploy (or redeploy) the product's application with ``settings`` (a ``ServeConfig``) on this process's Ray
    cluster, Serve's HTTP proxy on ``127.0.0.1:port``; returns the seconds until it was running."""
    from ray import serve

    from reflade.platform.worker import storage_fields
    from reflade.serve.app import build_app
    from reflade.serve.config import APP_NAME

    t = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(settings, storage_fields(world["cfg"]), world["cfg"].registry.prefix)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- (c)
def in_process(world: dict[str, Any], settings, sizes: list[int], items: int, threads: int) -> dict[str, Any]:
    """(c): the model the replica would load (``RefLayerPipeline.from_registry``, the same reference and device)
    called through ``reflade.serve.batching.decompose_group`` (the deployment's batched path) on the benchmark's
    request as the ingress parses it, ``items`` items per batch size (at least one call), after one untimed call;
    ``threads`` torch threads. Per size: items/s and the per-call latency percentiles (every item of a call waits
    for the whole call)."""
    import torch

    from reflade.serve.batching import decompose_group, request_item
    from reflade.serve.requests import Limits, parse_json_request
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    torch.set_num_threads(threads)
    t = time.perf_counter()
    pipe = RefLayerPipeline.from_registry(world["model"], world["registry"], device="cpu")
    load_s = time.perf_counter() - t
    req = parse_json_request(request_body(), Limits())
    # The item as the ingress hands it to the decomposer (the same builder), seeds drawn per item.
    base = request_item(req, req.prompts[0], model=world["model"], default_steps=settings.steps)
    out: dict[str, Any] = {"load_s": load_s, "threads": torch.get_num_threads(), "sizes": {}}
    out["request_work_ms"] = request_work(pipe, base)
    for size in sizes:
        decompose_group(pipe, [{**base, "seed": i} for i in range(size)])  # warm-up, untimed
        calls, done = [], 0
        t0 = time.perf_counter()
        while done < items or not calls:
            t = time.perf_counter()
            results = decompose_group(pipe, [{**base, "seed": done + i} for i in range(size)])
            calls.append(time.perf_counter() - t)
            if any("error" in r for r in results):
                raise RuntimeError(f"the model refused the benchmark's request: {results[0]}")
            done += size
        seconds = time.perf_counter() - t0
        out["sizes"][str(size)] = {
            "batch_size": size,
            "items": done,
            "calls": len(calls),
            "seconds": seconds,
            "throughput_rps": done / seconds,
            "ms_per_item": 1000 * seconds / done,
            **latency_stats(calls),
        }
    return out


def request_work(pipe, base: dict[str, Any], repeat: int = 50) -> dict[str, float]:
    """Medians (ms) of the per-request work the ingress does around the model, here in one thread: parsing the
    benchmark's JSON body (``json.loads`` and ``parse_json_request``: base64, the image header checks and decoding,
    the prompt) and making the JSON answer of a layer (``encode_png``, base64, ``json.dumps``)."""
    import json

    import numpy as np

    from reflade.engine.schema import encode_png
    from reflade.serve.batching import decompose_group
    from reflade.serve.requests import Limits, parse_json_request

    raw = json.dumps(request_body()).encode()
    layer = decompose_group(pipe, [{**base, "seed": 0}])[0]["layer"]
    parse, answer = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        parse_json_request(json.loads(raw), Limits())
        t1 = time.perf_counter()
        json.dumps({"layer_png": base64.b64encode(encode_png(layer)).decode(), "seed": 1})
        answer.append(time.perf_counter() - t1)
        parse.append(t1 - t)
    return {"parse_ms": 1000 * float(np.median(parse)), "answer_ms": 1000 * float(np.median(answer))}


# ---------------------------------------------------------------------------------------------- replicas
def replica_counts(deployment: str = "decomposer") -> dict[str, Any]:
    """The decomposer's replicas by state (``serve.status()``), and the deployment's status and trigger."""
    from ray import serve

    from reflade.serve.config import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None or deployment not in app.deployments:
        return {"running": 0, "total": 0, "states": {}}
    d = app.deployments[deployment]
    states = {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
    return {
        "running": states.get("RUNNING", 0),
        "total": sum(v for k, v in states.items() if k in ("RUNNING", "STARTING", "UPDATING", "RECOVERING")),
        "states": states,
        "status": str(getattr(d.status, "value", d.status)),
        "trigger": str(getattr(d.status_trigger, "value", d.status_trigger)),
    }


class ReplicaPoller:
    """Polls :func:`replica_counts` every ``interval_s`` in a thread; ``samples`` holds ``t_s`` (seconds after
    ``t0``, a time.perf_counter) with each reading."""

    def __init__(self, t0: float, interval_s: float = 1.0):
        self.t0, self.interval_s, self.samples = t0, interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reading = replica_counts()
            except Exception as e:  # noqa: BLE001 - a failed poll is recorded, the next one may work
                reading = {"error": f"{type(e).__name__}: {e}"[:200]}
            self.samples.append({"t_s": round(time.perf_counter() - self.t0, 2), **reading})
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ReplicaPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def latest(self) -> dict[str, Any]:
        return self.samples[-1] if self.samples else {}


def plot_autoscaling(scale: dict[str, Any], path: Path) -> None:
    """Replicas (running, and running + starting) over time above the answers per second and their p50, the load
    window shaded; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in scale["samples"] if "running" in s]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[1, 1.2])
    t = [s["t_s"] for s in samples]
    top.step(t, [s["total"] for s in samples], where="post", label="running + starting", color="tab:orange")
    top.step(t, [s["running"] for s in samples], where="post", label="running", color="tab:blue", lw=2)
    top.set_ylabel("decomposer replicas")
    top.set_ylim(0, scale["settings"]["max_replicas"] + 0.5)
    top.legend(loc="upper right", fontsize=8)
    rate = scale["per_second"]
    bottom.bar([r["t_s"] + 0.5 for r in rate], [r["ok_per_s"] for r in rate], width=0.9, color="tab:green")
    bottom.set_ylabel("answers (200) per s", color="tab:green")
    bottom.set_xlabel("seconds")
    twin = bottom.twinx()
    twin.plot([r["t_s"] + 0.5 for r in rate], [r["p50_ms"] for r in rate], ".", color="tab:red", ms=4)
    twin.set_ylabel("p50 latency in that second, ms", color="tab:red")
    for ax in (top, bottom):
        ax.axvspan(scale["load_start_s"], scale["load_end_s"], color="0.9", zorder=0)
    s = scale["settings"]
    fig.suptitle(
        f"Serve autoscaling: {scale['clients']} clients for {scale['load_end_s'] - scale['load_start_s']:.0f} s "
        f"(shaded), then idle\nreplicas {s['min_replicas']}-{s['max_replicas']} x {s['num_cpus']:g} CPU, "
        f"target_ongoing_requests "
        f"{s['target_ongoing_requests']:g}, upscale/downscale delay {s['upscale_delay_s']:g}/"
        f"{s['downscale_delay_s']:g} s",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
