"""Fixtures of the engine's tests (beside the suite's in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest

from reflade.platform.config import load_config


@pytest.fixture
def engine_cfg(storage_config, registry):
    """A configuration for ``run_engine`` against the suite's object store and this test's own registry prefix,
    with the engine's defaults but 2 images per batch."""
    cfg = load_config(None, env={})
    for f in ("endpoint", "bucket", "region", "access_key_id", "secret_access_key"):
        setattr(cfg.storage, f, getattr(storage_config, f))
    cfg.registry.prefix = registry.prefix.rstrip("/")
    eng = cfg.section("engine")
    eng.batch_size = 2
    return cfg
