"""Session fixtures shared by the whole suite: one real SeaweedFS on free ports, one local Ray cluster.

Each test that writes to the registry gets its own registry prefix, so tests never see each other's versions.
Tests that start their own servers (``reflade up``, restarts) use their own state directories and ports.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from reflade.platform.config import StorageConfig  # noqa: E402
from reflade.platform.registry import Registry  # noqa: E402
from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials  # noqa: E402
from reflade.platform.storage import Storage, write_credentials_file  # noqa: E402

TEST_BUCKET = "reflade-test"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real SeaweedFS (``weed mini``) with generated credentials, on free ports, for the whole session."""
    root = tmp_path_factory.mktemp("seaweed")
    server = SeaweedServer(root / "data", generate_credentials(), s3_port=find_free_base_port())
    server.start(timeout=60)
    server.create_bucket(TEST_BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def credentials_file(seaweed, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("creds") / "aws_credentials"
    write_credentials_file(path, seaweed.credentials)
    return path


@pytest.fixture(scope="session")
def storage_config(seaweed) -> StorageConfig:
    return StorageConfig(
        endpoint=seaweed.endpoint,
        bucket=TEST_BUCKET,
        access_key_id=seaweed.credentials.access_key_id,
        secret_access_key=seaweed.credentials.secret_access_key,
    )


@pytest.fixture(scope="session")
def storage(storage_config) -> Storage:
    return Storage(storage_config)


@pytest.fixture
def registry(storage) -> Registry:
    """A registry under a prefix of its own (isolation between tests sharing the bucket)."""
    return Registry(storage, prefix=f"registry-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def registry_env(registry, storage_config, monkeypatch) -> Registry:
    """The test registry in this process's environment, as a user's shell has it (what the CLI reads: endpoint,
    bucket, credentials, registry prefix), and a fresh CLI configuration; returns the registry."""
    from reflade.platform import cli

    for var, value in {
        "REFLADE_STORAGE_ENDPOINT": storage_config.endpoint,
        "REFLADE_STORAGE_BUCKET": storage_config.bucket,
        "AWS_ACCESS_KEY_ID": storage_config.access_key_id,
        "AWS_SECRET_ACCESS_KEY": storage_config.secret_access_key,
        "REFLADE_REGISTRY_PREFIX": registry.prefix.rstrip("/"),
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(cli.STATE, "_config", None)
    yield registry
    cli.STATE._config = None


@pytest.fixture(scope="session")
def cli_env(seaweed, credentials_file):
    """Factory: the environment of a ``reflade`` command run as a subprocess against the suite's object store, as a
    user's shell would have it. ``cli_env(registry, home, **extra)`` -> this process's environment without
    ``AWS_*``, ``REFLADE_*`` or ``RAY_ADDRESS``, plus the endpoint, the bucket, the 0600 credentials file (never a
    key), the registry's prefix and ``REFLADE_HOME=home``; ``extra`` adds variables or overrides these."""

    def make(registry: Registry, home: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REFLADE_", "RAY_ADDRESS"))}
        env.update(
            REFLADE_STORAGE_ENDPOINT=seaweed.endpoint,
            REFLADE_STORAGE_BUCKET=TEST_BUCKET,
            AWS_SHARED_CREDENTIALS_FILE=str(credentials_file),
            REFLADE_REGISTRY_PREFIX=registry.prefix.rstrip("/"),
            REFLADE_HOME=str(home),
        )
        env.update(extra)
        return env

    return make


@pytest.fixture(scope="session")
def ray_cluster(seaweed, credentials_file):
    """A local Ray cluster started by this process (never one left by `ray start` or `reflade up`).

    Workers inherit this process's environment: the endpoint and a 0600 credentials file, no key in a
    runtime_env.
    """
    import ray

    saved = {
        k: os.environ.get(k)
        for k in ("REFLADE_STORAGE_ENDPOINT", "REFLADE_STORAGE_BUCKET", "AWS_SHARED_CREDENTIALS_FILE")
    }
    os.environ["REFLADE_STORAGE_ENDPOINT"] = seaweed.endpoint
    os.environ["REFLADE_STORAGE_BUCKET"] = TEST_BUCKET
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(credentials_file)
    temp = tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp,
        namespace="reflade-tests",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_vae():
    """Builder of the tests' random 3-level ``AutoencoderKL`` (4x downscale, 4 latent channels; the scaling makes
    its latents about unit variance on synthetic scenes): ``tiny_vae(seed=0)``, the same weights for a seed."""
    import torch
    from diffusers import AutoencoderKL

    def build(seed: int = 0) -> AutoencoderKL:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(16, 32, 32),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=8,
                scaling_factor=2.8,
            )

    return build


_RAY_PORT_KEYS = (
    "ray_port",
    "dashboard_port",
    "ray_client_port",
    "dashboard_agent_port",
    "runtime_env_agent_port",
    "metrics_export_port",
    "serve_port",
)


@dataclass
class PrivateStack:
    """A user's fresh shell for a `reflade up` of the test's own: ``home`` (an empty HOME), ``config`` (a YAML
    file with only a ``stack`` section on free ports: the storage endpoint follows ``s3_port``), ``ports`` and
    ``env`` (PATH with the venv's bin first, as after `activate`, HOME, LANG, REFLADE_CONFIG; no RAY_*, no
    AWS_*)."""

    home: Path
    config: Path
    ports: dict[str, int]
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def private_stack():
    """Factory: ``private_stack(root)`` -> :class:`PrivateStack` under ``root`` (the stack is not started)."""

    def make(root: Path) -> PrivateStack:
        home = root / "home"
        home.mkdir(exist_ok=True)
        config = root / "reflade.yaml"
        ports = {"s3_port": find_free_base_port(), **{k: _free_port() for k in _RAY_PORT_KEYS}}
        lines = ["stack:"] + [f"  {k}: {v}" for k, v in ports.items()] + ["  ray_num_cpus: 2"]
        config.write_text("\n".join(lines) + "\n")
        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(home),
            "REFLADE_CONFIG": str(config),
            "LANG": "C.UTF-8",
        }
        return PrivateStack(home=home, config=config, ports=ports, env=env)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module that runs tiny torch models: OpenMP's spinning barriers collapse when the
    suite shares 2 cores with Ray. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
