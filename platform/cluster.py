"""Connecting to Ray: the configured address, else the embedded head of ``reflade up``, else a local cluster.

Workers get the object-store *location* (endpoint, bucket, region, registry prefix) through
``runtime_env["env_vars"]``, which Ray shows in its dashboard and job API, so credentials never go there:
workers read them from their own environment (the Ray head's, set by ``reflade up``; a Kubernetes Secret
in a KubeRay pod spec) or from the 0600 file named by ``AWS_SHARED_CREDENTIALS_FILE``.

Ray reads its client settings once and caches them: ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN_PATH`` in its C++
``RayConfig``, and whether 127.0.0.1 means this machine (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which keeps the
embedded head on loopback) at import. The ``reflade`` command sets them before anything imports Ray
(``use_embedded_head``); ``connect`` sets them too and makes an already imported Ray re-read them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from reflade.platform.config import Config
from reflade.platform.stack import SINGLE_MACHINE_ENV, EmbeddedStack, StackError, is_loopback

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


def embedded_client_env(state: dict[str, Any]) -> dict[str, str]:
    """The variables a Ray client process needs to reach the embedded head described by ``state``."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["ray"]["token_file"]}
    host = state["ray"]["address"].rsplit(":", 1)[0]
    if is_loopback(host):
        env[SINGLE_MACHINE_ENV] = "0"
    return env


def use_embedded_auth(state: dict[str, Any]) -> None:
    """Let this process talk to the embedded head (token authentication, bound to loopback).

    Sets the variables of ``embedded_client_env`` in ``os.environ`` (child processes inherit them) and, if Ray is
    already imported but not initialised, makes it re-read them.

    Raises:
        StackError: Ray was imported earlier and this Ray version offers no way to re-read its settings; the
            message names the variables to export before starting Python.
    """
    env = embedded_client_env(state)
    os.environ.update(env)
    # The head's token file is the one that works; a RAY_AUTH_TOKEN for another cluster would take precedence.
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _reload_ray_client_settings(env)


def use_embedded_head(cfg: Config) -> dict[str, Any] | None:
    """If this configuration's Ray target is the embedded head of ``reflade up``, prepare this process for it.

    The target is the embedded head when neither ``ray.address`` nor ``RAY_ADDRESS`` (set inside a Ray job)
    names another cluster and the head of ``cfg.stack``'s state directory is alive. Cheap (reads
    ``stack.json``) and does not import Ray: the ``reflade`` command calls it before any command group loads.

    Returns:
        The head's state (``stack.json``), or None when another cluster (or a local one) is the target.
    """
    if os.environ.get("RAY_ADDRESS"):
        return None
    state = embedded_head(cfg)
    if not state or (cfg.ray.address and cfg.ray.address != state["ray"]["address"]):
        return None
    use_embedded_auth(state)
    return state


def _reload_ray_client_settings(env: dict[str, str]) -> None:
    """Make an already imported (not yet initialised) Ray see ``env``; nothing to do if Ray is not imported."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        return  # connected already: connect() keeps that connection
    try:
        import ray._private.ray_constants as ray_constants
        from ray._raylet import AuthenticationTokenLoader
        from ray._raylet import Config as RayCoreConfig

        # What Ray itself does when it turns token auth on for a local cluster (authentication_token_setup).
        RayCoreConfig.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        if SINGLE_MACHINE_ENV in env:
            ray_constants.ENABLE_RAY_CLUSTER = env[SINGLE_MACHINE_ENV] != "0"
    except (ImportError, AttributeError) as e:
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        raise StackError(
            f"Ray {ray.__version__} was imported before the embedded head's settings were set and cannot "
            f"re-read them ({type(e).__name__}: {e}); export {exports} before starting Python, or call "
            f"reflade.platform.cluster.connect(cfg) before importing ray"
        ) from None


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
    from ray.exceptions import AuthenticationError

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
    state = use_embedded_head(cfg)
    if state:
        address = state["ray"]["address"]
    if address:
        try:
            ray.init(
                address=address, namespace=cfg.ray.namespace, runtime_env=env, log_to_driver=log_to_driver
            )
        except (ConnectionError, AuthenticationError) as e:
            hint = (
                "is the stack up? `reflade status`"
                if state
                else "check ray.address, and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH for a head with token auth"
            )
            raise StackError(
                f"cannot connect to the Ray cluster at {address}: {_last_line(e)}; {hint}"
            ) from None
    else:
        ray.init(
            address="local",
            namespace=cfg.ray.namespace,
            runtime_env=env,
            num_cpus=cfg.ray.num_cpus,
            log_to_driver=log_to_driver,
        )
    return ray.get_runtime_context()


def _last_line(e: BaseException) -> str:
    """The most specific line of a Ray connection error (the chained cause's, where there is one)."""
    cause = e.__cause__ or e
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else type(cause).__name__


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
