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


def test_an_imported_ray_rereads_the_embedded_heads_settings(tmp_path):
    """Library use: `import ray` first, then `connect(cfg)`; Ray has cached its auth mode and its idea of
    127.0.0.1 by then, and `use_embedded_auth` must make it read them again (in a fresh process)."""
    import os
    import subprocess
    import sys
    import textwrap

    token = tmp_path / "ray_auth_token"
    token.write_text("a" * 64)
    script = textwrap.dedent(
        f"""
        import os
        import ray
        from ray._private import services
        from ray._raylet import AuthenticationMode, get_authentication_mode

        assert get_authentication_mode() == AuthenticationMode.DISABLED

        from reflade.platform.cluster import use_embedded_auth

        use_embedded_auth({{"ray": {{"token_file": "{token}", "address": "127.0.0.1:6379"}}}})
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        assert services.resolve_ip_for_localhost("127.0.0.1") == "127.0.0.1"
        assert os.environ["RAY_AUTH_TOKEN_PATH"] == "{token}" and "RAY_AUTH_TOKEN" not in os.environ
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "REFLADE_", "AWS_"))}
    env.update(HOME=str(tmp_path), RAY_AUTH_TOKEN="a-token-for-another-cluster")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "a.yaml", "engine", "run"], "a.yaml"),
        (["--config=b.yaml", "train"], "b.yaml"),
        (["-c", "c.yaml", "jobs", "ls"], "c.yaml"),
        (["-cd.yaml", "jobs", "ls"], "d.yaml"),
        (["engine", "run", "--config", "not-the-root-option"], None),
        ([], None),
    ],
)
def test_cli_finds_the_root_config_option_before_the_command(argv, expected):
    from reflade.platform.cli import _config_option

    assert _config_option(argv) == expected
