"""Connecting to Ray: the configured address, else the embedded head of ``reflade up``, else a local cluster.

Workers get the object-store *location* (endpoint, bucket, region, registry prefix) through
``runtime_env["env_vars"]``, which Ray shows in its dashboard and job API, so credentials never go there:
workers read them from their own environment (the Ray head's, set by ``reflade up``; a Kubernetes Secret
in a KubeRay pod spec) or from the 0600 file named by ``AWS_SHARED_CREDENTIALS_FILE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reflade.platform.config import Config
from reflade.platform.stack import EmbeddedStack, StackError

# Variables that may travel to workers: locations only, never keys.
PUBLIC_ENV_FIELDS = {
    "REFLADE_STORAGE_ENDPOINT": ("storage", "endpoint"),
    "REFLADE_STORAGE_BUCKET": ("storage", "bucket"),
    "REFLADE_STORAGE_REGION": ("storage", "region"),
    "REFLADE_REGISTRY_PREFIX": ("registry", "prefix"),
}
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


def worker_env_vars(cfg: Config) -> dict[str, str]:
    """The non-secret configuration workers need to find the bucket and the registry."""
    out = {}
    for var, (section, key) in PUBLIC_ENV_FIELDS.items():
        out[var] = str(getattr(cfg.section(section), key))
    return out


def check_no_secrets(runtime_env: dict[str, Any]) -> None:
    """Refuse a runtime_env that would publish a credential (Ray shows runtime_env in its dashboard)."""
    env_vars = runtime_env.get("env_vars") or {}
    bad = [k for k in env_vars if k in SECRET_ENV or "SECRET" in k.upper() or "TOKEN" in k.upper()]
    if bad:
        raise ValueError(
            f"refusing to put {', '.join(sorted(bad))} in a runtime_env: Ray shows it in the dashboard and the "
            f"job API; give workers credentials through their own environment or AWS_SHARED_CREDENTIALS_FILE"
        )


def embedded_head(cfg: Config) -> dict[str, Any] | None:
    """The state of a running ``reflade up`` stack for this configuration, or None."""
    stack = EmbeddedStack(cfg.stack, cfg.storage)
    try:
        state = stack.read_state()
    except StackError:
        return None
    if not state:
        return None
    from reflade.platform.stack import _group_alive

    if not _group_alive(state["ray"]["pid"]):
        return None
    return state


def use_embedded_auth(state: dict[str, Any]) -> None:
    """Let this process talk to the embedded head, which runs with token authentication."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = state["ray"]["token_file"]


def ray_address(cfg: Config) -> str | None:
    """The address ``connect`` will use: configured, else the embedded head's, else None (start local)."""
    if cfg.ray.address:
        return cfg.ray.address
    state = embedded_head(cfg)
    return state["ray"]["address"] if state else None


def connect(cfg: Config, *, runtime_env: dict[str, Any] | None = None, log_to_driver: bool = True):
    """``ray.init`` for this configuration (no-op if Ray is already initialised in this process).

    The storage location goes to workers in ``runtime_env["env_vars"]``; credentials never do.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    env = dict(runtime_env or {})
    env["env_vars"] = {**worker_env_vars(cfg), **(env.get("env_vars") or {})}
    check_no_secrets(env)
    address = cfg.ray.address
    if not address and os.environ.get("RAY_ADDRESS"):
        # Inside a Ray job: attach to its cluster. The job's runtime_env already carries the locations, and
        # Ray refuses a driver runtime_env that repeats its keys.
        ray.init(
            address="auto", namespace=cfg.ray.namespace, runtime_env=runtime_env, log_to_driver=log_to_driver
        )
        return ray.get_runtime_context()
    if not address:
        state = embedded_head(cfg)
        if state:
            use_embedded_auth(state)
            address = state["ray"]["address"]
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, runtime_env=env, log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",
            namespace=cfg.ray.namespace,
            runtime_env=env,
            num_cpus=cfg.ray.num_cpus,
            log_to_driver=log_to_driver,
        )
    return ray.get_runtime_context()


def dashboard_url(cfg: Config) -> str:
    """Job-submission URL: configured, else the embedded head's."""
    if cfg.ray.dashboard_url:
        return cfg.ray.dashboard_url.rstrip("/")
    state = embedded_head(cfg)
    if state:
        return state["ray"]["dashboard_url"]
    raise StackError(
        "no Ray cluster to submit to: run `reflade up`, or set ray.dashboard_url "
        "(REFLADE_RAY_DASHBOARD_URL=http://HEAD:8265)"
    )


def auth_token(cfg: Config) -> str | None:
    """Token for a head with token authentication: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, the embedded one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).exists():
        return Path(path).read_text().strip() or None
    if not cfg.ray.dashboard_url:
        state = embedded_head(cfg)
        if state:
            return Path(state["ray"]["token_file"]).read_text().strip() or None
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.exists() else None
