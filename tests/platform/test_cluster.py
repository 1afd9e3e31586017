"""Ray connection policy: locations travel to workers, credentials never do; the stack refuses to run open."""

from __future__ import annotations

import pytest

from reflade.platform.cluster import check_no_secrets, worker_env_vars
from reflade.platform.config import load_config
from reflade.platform.stack import SeaweedServer, StackError
from reflade.platform.storage import Credentials


def test_worker_env_carries_locations_not_keys():
    cfg = load_config(
        None,
        env={
            "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret-value",
            "REFLADE_STORAGE_ENDPOINT": "http://10.0.0.5:9000",
            "REFLADE_STORAGE_BUCKET": "team-bucket",
        },
    )
    env = worker_env_vars(cfg)
    assert env["REFLADE_STORAGE_ENDPOINT"] == "http://10.0.0.5:9000"
    assert env["REFLADE_STORAGE_BUCKET"] == "team-bucket"
    assert env["REFLADE_REGISTRY_PREFIX"] == "registry"
    joined = " ".join(f"{k}={v}" for k, v in env.items())
    assert "very-secret-value" not in joined and "AKIDEXAMPLE" not in joined
    check_no_secrets({"env_vars": env})  # passes


@pytest.mark.parametrize(
    "var", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN", "MY_API_TOKEN"]
)
def test_runtime_env_with_a_credential_is_refused(var):
    with pytest.raises(ValueError, match=var):
        check_no_secrets({"env_vars": {var: "x"}})


def test_seaweedfs_never_starts_without_credentials(tmp_path):
    server = SeaweedServer(tmp_path / "data", Credentials("", ""), s3_port=1)
    with pytest.raises(StackError, match="without credentials"):
        server.start()
    assert not (tmp_path / "data").exists()
