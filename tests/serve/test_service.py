"""The decomposition service on a real local Ray cluster and SeaweedFS, over real HTTP: the tiny model (two versions)
and classical; each endpoint, both kinds, auth, versions side by side, an alias moved under traffic, 4xx errors."""

from __future__ import annotations

import base64
import io
import threading
import zipfile

import numpy as np
import pytest
import requests

from reflade.engine.schema import decode_image, encode_png
from reflade.engine.synth import make_scene

pytestmark = pytest.mark.usefixtures("ray_cluster", "one_torch_thread")


def _scene():
    scene = make_scene(3, size=(64, 80), n_objects=(2, 2))
    return scene.image, [int(v) for v in scene.objects[0].box]


def _post(service, body, token=True, **kw):
    headers = {"Authorization": f"Bearer {service['token']}"} if token else {}
    return requests.post(service["url"] + "/v1/decompose", json=body, headers=headers, timeout=120, **kw)


def _body(image, **kw):
    return {"image": base64.b64encode(encode_png(image)).decode(), **kw}


def test_openapi_describes_the_bodies_and_errors(service):
    doc = requests.get(service["url"] + "/openapi.json", timeout=30).json()
    op = doc["paths"]["/v1/decompose"]["post"]
    assert set(op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert op["requestBody"]["content"]["application/json"]["schema"]["required"] == ["image"]
    assert {"200", "401", "413", "422", "503"} <= set(op["responses"])
    assert "/v1/decompose/layers" in doc["paths"] and "/v1/models" in doc["paths"]


def test_health_and_readiness_are_open(service):
    assert requests.get(service["url"] + "/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(service["url"] + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["model"] == service["refs"][0]


def test_auth(service):
    image, box = _scene()
    r = _post(service, _body(image, prompt={"box": box}, model="classical"), token=False)
    assert r.status_code == 401, r.text
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
    r = requests.post(
        service["url"] + "/v1/decompose",
        json=_body(image, prompt={"box": box}, model="classical"),
        headers={"Authorization": "Bearer rl_wrong"},
        timeout=60,
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_token"


def test_decompose_png_and_json_both_kinds(service):
    image, box = _scene()
    r = _post(service, _body(image, prompt={"box": box}, model="classical"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["X-RefLade-Model"] == "classical"
    layer = decode_image(r.content, "RGBA")
    assert layer.shape == (64, 80, 4)
    r = _post(
        service,
        _body(
            image, prompt={"box": box, "text": "the red shape"}, kind="background", response="json", seed=5
        ),
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"] == service["refs"][0] and doc["seed"] == 5 and doc["kind"] == "background"
    bg = decode_image(base64.b64decode(doc["layer_png"]), "RGBA")
    assert bg.shape == (64, 80, 4) and doc["timings"]["batch_size"] >= 1


def test_multipart_upload(service):
    image, box = _scene()
    r = requests.post(
        service["url"] + "/v1/decompose",
        files={"image": ("scene.png", encode_png(image), "image/png")},
        data={"box": ",".join(map(str, box)), "text": "a shape", "kind": "foreground", "model": "classical"},
        headers={"Authorization": f"Bearer {service['token']}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert decode_image(r.content, "RGBA").shape == (64, 80, 4)


def test_layer_stack_zip_and_ora(service):
    image, box = _scene()
    prompts = [{"box": box}, {"points": [[box[0] + 3, box[1] + 3, 1]]}, {"box": [0, 0, 40, 40]}]
    headers = {"Authorization": f"Bearer {service['token']}"}
    for fmt in ("zip", "ora"):
        r = requests.post(
            service["url"] + "/v1/decompose/layers",
            params={"format": fmt},
            json=_body(image, prompts=prompts, model="classical"),
            headers=headers,
            timeout=120,
        )
        assert r.status_code == 200, r.text
        z = zipfile.ZipFile(io.BytesIO(r.content))
        pngs = [n for n in z.namelist() if n.endswith(".png") and not n.startswith(("Thumbnails", "merged"))]
        assert len(pngs) >= 3
        if fmt == "ora":
            assert z.namelist()[0] == "mimetype" and z.read("mimetype") == b"image/openraster"


def test_versions_side_by_side_and_an_alias_moved_under_traffic(service):
    image, box = _scene()
    m1, m2 = service["refs"]
    seen = {}
    for ref in (m1, m2):
        r = _post(service, _body(image, prompt={"box": box}, model=ref, response="json"))
        assert r.status_code == 200, r.text
        seen[ref] = r.json()["model"]
    assert seen == {m1: m1, m2: m2}
    statuses, models = [], []

    def client(n):
        for _ in range(n):
            r = _post(service, _body(image, prompt={"box": box}, response="json"))
            statuses.append(r.status_code)
            if r.status_code == 200:
                models.append(r.json()["model"])

    threads = [threading.Thread(target=client, args=(4,)) for _ in range(3)]
    for t in threads:
        t.start()
    service["registry"].set_alias(m2, "production")
    for t in threads:
        t.join(timeout=300)
    assert statuses and set(statuses) == {200}
    import time

    time.sleep(1.5)  # alias_refresh_s
    r = _post(service, _body(image, prompt={"box": box}, response="json"))
    assert r.json()["model"] == m2
    assert set(models) <= {m1, m2}
    service["registry"].set_alias(m1, "production")


@pytest.mark.parametrize(
    "body_fn, status, code",
    [
        (
            lambda img, box: {
                "image": base64.b64encode(encode_png(img)[:50]).decode(),
                "prompt": {"box": box},
            },
            400,
            None,
        ),
        (lambda img, box: _body(img, prompt={"box": box}, model="model/nope@1"), 404, "unknown_model"),
        (lambda img, box: _body(img, prompt={"text": "the red shape"}, model="classical"), 422, "refused"),
        (lambda img, box: _body(img, prompt={"box": [0, 0, 500, 500]}, model="classical"), 422, None),
        (lambda img, box: _body(img, prompt={}, model="classical"), 422, None),
        (lambda img, box: _body(img, prompt={"box": box}, kind="scene"), 422, None),
    ],
)
def test_bad_requests_are_4xx_json_and_the_service_stays_healthy(service, body_fn, status, code):
    image, box = _scene()
    r = _post(service, body_fn(image, box))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (code is None or err["code"] == code)
    assert requests.get(service["url"] + "/healthz", timeout=30).status_code == 200


def test_wrong_content_type_and_bad_json(service):
    headers = {"Authorization": f"Bearer {service['token']}"}
    r = requests.post(
        service["url"] + "/v1/decompose",
        data=b"hello",
        headers={**headers, "Content-Type": "text/plain"},
        timeout=30,
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = requests.post(
        service["url"] + "/v1/decompose",
        data=b"{nope",
        headers={**headers, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400


def test_models_metrics_and_the_client(service):
    from reflade.serve.client import Client, ServeError

    client = Client(service["url"], service["token"])
    assert client.models()["default"]["version"] in service["refs"]
    image, box = _scene()
    layer = client.decompose(image, {"box": box}, kind="foreground", model="classical")
    assert layer.shape == (64, 80, 4) and layer.dtype == np.uint8
    with pytest.raises(ServeError, match="HTTP 404 unknown_model"):
        client.decompose(image, {"box": box}, model="model/absent@1")
    text = requests.get(service["url"] + "/metrics", timeout=30).text
    assert 'reflade_requests_total{endpoint="decompose",model="classical",status="200"}' in text
    assert "reflade_batch_size_total" in text and "reflade_request_seconds_bucket" in text


def test_full_queues_answer_503_with_retry_after(service):
    """Redeployed with one replica taking one request and one waiting: a burst gets 200s and 503s, never a 500."""
    from concurrent.futures import ThreadPoolExecutor

    from reflade.serve.config import ServeConfig

    tight = ServeConfig(
        steps=30,
        num_cpus=0.5,
        min_replicas=1,
        max_replicas=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        max_batch_size=1,
    )
    service["deploy"](tight)
    image, box = _scene()
    body = _body(image, prompt={"box": box}, response="json")
    try:
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: _post(service, body), range(10)))
    finally:
        service["deploy"]()
    codes = [r.status_code for r in answers]
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "busy"
    assert requests.get(service["url"] + "/healthz", timeout=30).status_code == 200


def test_serve_config_file_for_a_remote_cluster(registry_env, tmp_path):
    """`reflade serve config` writes a file Ray Serve's own schema accepts, whose builder makes the app, with no
    credential in it."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from reflade.platform.cli import run_typer
    from reflade.serve.app import app_from_args
    from reflade.serve.cli import app

    out = tmp_path / "serve.yaml"
    args = [
        "config",
        "-o",
        str(out),
        "--model",
        "model/reflayer@7",
        "--wheel",
        "s3://b/reflade-0.1.0-py3-none-any.whl",
    ]
    assert run_typer(app, args, "reflade serve") == 0
    text = out.read_text()
    doc = yaml.safe_load(text)
    ServeDeploySchema(**doc)  # raises on anything Serve would refuse
    a = doc["applications"][0]
    assert (
        a["import_path"] == "reflade.serve.app:app_from_args"
        and a["args"]["settings"]["model"] == "model/reflayer@7"
    )
    assert set(a["args"]["storage"]) == {"endpoint", "bucket", "region"}
    secret = registry_env.storage.config.secret_access_key
    assert secret and secret not in text and "secret" not in text.lower()
    assert app_from_args(a["args"]) is not None
    with pytest.raises(ValueError, match="not \\['secret_access_key'\\]"):
        app_from_args({**a["args"], "storage": {**a["args"]["storage"], "secret_access_key": "x"}})
