"""The ``doctor`` job: where the code runs from, and whether the object store and Ray answer from there.

Run it on a cluster with ``reflade jobs submit doctor`` to check that a fresh cluster can import the
shipped package and reach the bucket with the credentials of its own environment.
"""

from __future__ import annotations

import json
import platform as stdlib_platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def report() -> dict[str, Any]:
    import reflade.platform as pkg
    import reflade.platform.config as config_module
    from reflade.platform.config import load_config
    from reflade.platform.storage import Storage, StorageError

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "reflade_version": _version("reflade"),
        "reflade_platform_path": list(pkg.__path__),
        "reflade_module_file": config_module.__file__,
        "stdlib_platform": stdlib_platform.system(),
        "stdlib_platform_file": getattr(stdlib_platform, "__file__", None),
        "ray_version": _version("ray"),
    }
    try:
        cfg = load_config()
        storage = Storage.from_config(cfg)
        storage.check()
        out["storage"] = {
            "endpoint": storage.endpoint,
            "bucket": storage.bucket,
            "status": "ok",
            "credentials_from": storage._creds.source,
        }
    except (StorageError, ValueError) as e:
        out["storage"] = {"status": "error", "error": str(e)}
    try:
        import ray

        from reflade.platform.cluster import connect

        connect(cfg, log_to_driver=False)
        out["ray"] = {"resources": ray.cluster_resources(), "nodes": len(ray.nodes())}
    except Exception as e:  # report, don't crash: this job exists to diagnose
        out["ray"] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    return out


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    result = report()
    print("REFLADE_DOCTOR " + json.dumps(result, sort_keys=True))
    return 0 if result.get("storage", {}).get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
