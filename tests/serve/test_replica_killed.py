"""A decomposer replica's process SIGKILLed from outside while clients keep sending: every answer is a 200 or a 503
(the ingress sends a lost request again, then answers 503), never a 500 or a hang; the controller starts a new replica
and the service answers again."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time

import pytest
import requests

from reflade.engine.schema import encode_png
from reflade.engine.synth import make_scene

pytestmark = pytest.mark.usefixtures("ray_cluster", "one_torch_thread")


def _decomposer_pids() -> set[int]:
    """PIDs of the live decomposer replicas, from the GCS's actor table (the test cluster has no dashboard, so
    ``ray.util.state`` cannot be used; this reads the same table through the driver's GCS connection)."""
    import ray._private.state as ray_state

    from reflade.serve.config import APP_NAME

    return {
        int(a["Pid"])
        for a in ray_state.actors().values()
        if a["ActorClassName"] == f"ServeReplica:{APP_NAME}:decomposer" and a["State"] == "ALIVE" and a["Pid"]
    }


def test_a_killed_decomposer_replica_costs_no_500_and_the_service_recovers(service):
    from reflade.serve.config import ServeConfig

    scene = make_scene(6, size=(48, 64), n_objects=(2, 2))
    body = {
        "image": base64.b64encode(encode_png(scene.image)).decode(),
        "prompt": {"box": [int(v) for v in scene.objects[0].box]},
        "steps": 6,
        "response": "json",
    }
    headers = {"Authorization": f"Bearer {service['token']}"}
    # One replica, so the kill hits the replica that holds the requests in flight.
    service["deploy"](ServeConfig(steps=2, num_cpus=0.5, min_replicas=1, max_replicas=1, max_batch_size=4))
    try:
        assert requests.post(service["url"] + "/v1/decompose", json=body, headers=headers, timeout=120).ok
        (victim,) = _decomposer_pids()
        answers: list[tuple[float, int]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    r = requests.post(
                        service["url"] + "/v1/decompose", json=body, headers=headers, timeout=90
                    )
                    answers.append((time.monotonic(), r.status_code))
                    if r.status_code == 503:
                        time.sleep(float(r.headers.get("Retry-After", "1")))
                except requests.Timeout:
                    answers.append((time.monotonic(), -1))  # a hang

        threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed_at + 90
        while time.monotonic() < deadline:  # until some request made after the kill has succeeded
            if any(t > killed_at + 1 and code == 200 for t, code in answers):
                break
            time.sleep(0.5)
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        codes = [code for _, code in answers]
        after = [code for t, code in answers if t > killed_at]
        print(
            f"\nanswers: {len(codes)} ({codes.count(200)} x 200, {codes.count(503)} x 503), {len(after)} after the kill"
        )
        assert set(codes) <= {200, 503}, codes
        assert 200 in after, f"no success within 90 s of the kill: {after}"
        new = _decomposer_pids()
        assert new and victim not in new
        assert requests.get(service["url"] + "/healthz", timeout=30).status_code == 200
    finally:
        service["deploy"]()
