"""The decomposition service for an HTTP test module: one deployment per module, removed (``serve.shutdown``) at the
module's end, so its replicas never hold the cluster's CPUs while later modules (Ray Train, Ray Data) need them.

``service`` deploys the app on the session's Ray cluster and SeaweedFS with a fresh registry: two versions of the
tiny model (``production`` -> the first), one API token. A test that redeploys with other settings calls
``service["deploy"](settings)`` and puts the default back with ``service["deploy"]()`` in a ``finally``.
"""

from __future__ import annotations

import socket
import uuid

import pytest

from reflade.platform.registry import Registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, storage, storage_config, tiny_vae, tmp_path_factory):
    """The app deployed with a fresh registry: model/reflayer@1 and @2 (production -> @1), one API token."""
    import torch
    from ray import serve

    from reflade.serve.app import TOKEN_HASHES_KEY, build_app
    from reflade.serve.auth import new_token
    from reflade.serve.config import APP_NAME, ServeConfig
    from reflade.train.model import build_reflayer
    from reflade.train.text import MiniLMTextEncoder, minilm_folder

    tmp = tmp_path_factory.mktemp("serve")
    registry = Registry(storage, prefix=f"registry-{uuid.uuid4().hex[:10]}")
    refs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in (0, 1):
            bundle = build_reflayer(
                "tiny", vae=tiny_vae(), text=MiniLMTextEncoder(minilm_folder()), seed=seed
            )
            refs.append(
                registry.create("model", "reflayer", bundle.save(tmp / f"m{seed}"), progress=False).ref
            )
    finally:
        torch.set_num_threads(threads)
    registry.set_alias(refs[0], "production")
    token, digest = new_token()
    storage.put_json(
        f"{registry.prefix.rstrip('/')}/{TOKEN_HASHES_KEY}", {"tokens": [{"name": "t", "hash": digest}]}
    )
    port = _free_port()
    default = ServeConfig(steps=2, alias_refresh_s=1.0, num_cpus=0.5, max_batch_size=4)
    fields = {
        "endpoint": storage_config.endpoint,
        "bucket": storage_config.bucket,
        "region": storage_config.region,
    }
    prefix = registry.prefix.rstrip("/")

    def deploy(settings: ServeConfig | None = None) -> None:
        serve.run(build_app(settings or default, fields, prefix), name=APP_NAME, route_prefix="/")

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy()
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "token": token,
            "refs": refs,
            "registry": registry,
            "fields": fields,
            "prefix": prefix,
            "settings": default,
            "deploy": deploy,
        }
    finally:
        serve.shutdown()
