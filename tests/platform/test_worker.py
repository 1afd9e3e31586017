"""The registry inside a worker (reflade.platform.worker) and the weights cache's location
(reflade.platform.weights): what travels to a worker holds no credential, and a worker rebuilds the driver's
registry from it with its own environment's credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflade.platform.config import load_config
from reflade.platform.weights import default_cache_dir
from reflade.platform.worker import storage_fields, worker_registry, worker_storage


def test_storage_fields_are_locations_only(storage_config):
    cfg = load_config(
        env={
            "REFLADE_STORAGE_ENDPOINT": storage_config.endpoint,
            "REFLADE_STORAGE_BUCKET": storage_config.bucket,
            "AWS_ACCESS_KEY_ID": storage_config.access_key_id,
            "AWS_SECRET_ACCESS_KEY": storage_config.secret_access_key,
        }
    )
    fields = storage_fields(cfg)
    assert fields == {
        "endpoint": storage_config.endpoint,
        "bucket": storage_config.bucket,
        "region": "us-east-1",
    }
    assert storage_config.secret_access_key not in repr(fields)
    with pytest.raises(ValueError, match=r"\['secret_access_key'\] are not locations"):
        worker_storage({**fields, "secret_access_key": "x"})


def test_worker_registry_reads_what_the_driver_wrote(
    registry, storage_config, credentials_file, monkeypatch, tmp_path
):
    # A worker's environment: the credentials file, no key in the fields it was handed.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "REFLADE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "a.txt").write_text("hello")
    ref = registry.create("weights", "worker-check", tmp_path / "w", progress=False).ref
    fields = {"endpoint": storage_config.endpoint, "bucket": storage_config.bucket, "region": "us-east-1"}
    remote = worker_registry(fields, registry.prefix)
    assert remote.resolve("weights/worker-check").ref == ref
    assert worker_storage(fields) is remote.storage  # built once per process
    assert worker_registry(None, registry.prefix) is None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "reflade" / "weights"
    assert default_cache_dir("~/w") == Path("~/w").expanduser()
