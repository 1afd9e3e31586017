"""The object store and registry inside a Ray worker, rebuilt from non-secret locations.

A driver hands its workers only where the bucket is (:func:`storage_fields`: endpoint, bucket, region) and the
registry prefix; each worker process builds its own :class:`~reflade.platform.storage.Storage` from those and
from its own environment's credentials (design.md: credentials never travel in a task's arguments or a
``runtime_env``). One module for every package: the data engine's stage actors, the training workers and the
latent-caching actors all call :func:`worker_registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reflade.platform.config import Config
    from reflade.platform.registry import Registry
    from reflade.platform.storage import Storage

__all__ = ["storage_fields", "worker_registry", "worker_storage"]

_FIELDS = ("endpoint", "bucket", "region")
_STORAGE_CACHE: dict[tuple, Any] = {}


def storage_fields(cfg: Config) -> dict[str, Any]:
    """The non-secret locations of ``cfg``'s object store, as workers take them: ``endpoint``, ``bucket``,
    ``region``."""
    s = cfg.storage
    return {name: getattr(s, name) for name in _FIELDS}


def worker_storage(fields: dict[str, Any]) -> Storage:
    """A Storage for the bucket described by ``fields`` (endpoint, bucket, region), built once per worker
    process; credentials come from the worker's own environment, never from the task's arguments.

    Raises:
        ValueError: ``fields`` holds a key that is not a location (a credential must not travel this way).
    """
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"worker storage fields {unknown} are not locations (known: {', '.join(_FIELDS)})")
    key = tuple(sorted(fields.items()))
    if key not in _STORAGE_CACHE:
        from reflade.platform.config import load_config
        from reflade.platform.storage import Storage

        cfg = load_config()
        for k, v in fields.items():
            setattr(cfg.storage, k, v)
        _STORAGE_CACHE[key] = Storage.from_config(cfg)
    return _STORAGE_CACHE[key]


def worker_registry(fields: dict[str, Any] | None, prefix: str | None) -> Registry | None:
    """The registry the driver uses, rebuilt in a worker from ``fields`` (:func:`storage_fields`) and the
    registry ``prefix`` (None: the default ``registry``); None when ``fields`` is None."""
    if fields is None:
        return None
    from reflade.platform.registry import Registry

    return Registry(worker_storage(fields), prefix or "registry")
