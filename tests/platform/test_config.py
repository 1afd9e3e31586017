"""The configuration contract: defaults < YAML file < REFLADE_* variables (plus AWS_*), errors that name the key
and the known ones, masked secrets in ``reflade config show``, and the plug-in groups ``reflade.config``,
``reflade.commands`` and ``reflade.jobs`` exercised through a fake distribution on ``PYTHONPATH``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reflade.platform import cli
from reflade.platform.config import ConfigError, StorageConfig, load_config

VENV_BIN = Path(sys.executable).parent
REFLADE = VENV_BIN / "reflade"
SECRET = "s3cr3t-Zq81-do-not-print-me"


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any configuration (session fixtures set REFLADE_* / AWS_*)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REFLADE_", "AWS_")) and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(extra)
    return env


@pytest.fixture
def clean_environ(monkeypatch):
    """os.environ without REFLADE_* / AWS_* variables, for in-process CLI calls."""
    for k in list(os.environ):
        if k.startswith(("REFLADE_", "AWS_")):
            monkeypatch.delenv(k)
    return monkeypatch


# ---------------------------------------------------------------------------------------------- precedence
def test_defaults_describe_the_embedded_stack():
    cfg = load_config(None, env={})
    assert cfg.storage.endpoint == "http://127.0.0.1:8333"
    assert cfg.storage.bucket == "reflade"
    assert cfg.storage.region == "us-east-1"
    assert cfg.storage.access_key_id is None and cfg.storage.secret_access_key is None
    assert cfg.storage.max_attempts == 10
    assert cfg.ray.namespace == "reflade"
    assert cfg.registry.prefix == "registry"
    assert cfg.stack.s3_port == 8333
    assert cfg.source_file is None
    assert {"storage", "ray", "registry", "stack"} <= set(cfg.sections)


def test_yaml_overrides_defaults_and_env_overrides_yaml(tmp_path):
    f = _write(
        tmp_path / "c.yaml",
        """\
        storage:
          bucket: from-yaml
          endpoint: http://10.0.0.5:9000
          max_attempts: "4"
        registry:
          prefix: reg-yaml
        """,
    )
    cfg = load_config(f, env={})
    assert cfg.storage.bucket == "from-yaml"
    assert cfg.storage.endpoint == "http://10.0.0.5:9000"
    assert cfg.storage.max_attempts == 4  # coerced to the field's type
    assert cfg.storage.region == "us-east-1"  # untouched fields keep their defaults
    assert cfg.registry.prefix == "reg-yaml"
    assert cfg.source_file == str(f)

    cfg = load_config(f, env={"REFLADE_STORAGE_BUCKET": "from-env"})
    assert cfg.storage.bucket == "from-env"
    assert cfg.storage.endpoint == "http://10.0.0.5:9000"  # the rest of the file still applies


def test_empty_yaml_file_means_defaults(tmp_path):
    cfg = load_config(_write(tmp_path / "empty.yaml", ""), env={})
    assert cfg.storage.bucket == "reflade"


def test_aws_variables_fill_credentials():
    cfg = load_config(None, env={"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert cfg.storage.access_key_id == "AKIDEXAMPLE"
    assert cfg.storage.secret_access_key == SECRET


def test_aws_variables_sit_between_yaml_and_reflade_variables(tmp_path):
    f = _write(tmp_path / "c.yaml", "storage: {access_key_id: from-yaml, region: eu-west-1}\n")
    assert load_config(f, env={}).storage.access_key_id == "from-yaml"
    cfg = load_config(f, env={"AWS_ACCESS_KEY_ID": "from-aws", "AWS_DEFAULT_REGION": "eu-north-1"})
    assert cfg.storage.access_key_id == "from-aws"
    assert cfg.storage.region == "eu-north-1"
    cfg = load_config(
        f, env={"AWS_ACCESS_KEY_ID": "from-aws", "REFLADE_STORAGE_ACCESS_KEY_ID": "from-reflade"}
    )
    assert cfg.storage.access_key_id == "from-reflade"


def test_reflade_config_variable_selects_the_file(tmp_path):
    f = _write(tmp_path / "c.yaml", "storage: {bucket: via-env-file}\n")
    cfg = load_config(None, env={"REFLADE_CONFIG": str(f)})
    assert cfg.storage.bucket == "via-env-file"
    assert cfg.source_file == str(f)
    # An explicit path wins over REFLADE_CONFIG.
    g = _write(tmp_path / "g.yaml", "storage: {bucket: explicit-file}\n")
    assert load_config(g, env={"REFLADE_CONFIG": str(f)}).storage.bucket == "explicit-file"


def test_reserved_reflade_variables_are_not_sections(tmp_path):
    cfg = load_config(None, env={"REFLADE_HOME": str(tmp_path)})
    assert cfg.storage.bucket == "reflade"


def test_env_values_are_coerced_to_the_field_type():
    cfg = load_config(
        None,
        env={
            "REFLADE_STORAGE_MAX_ATTEMPTS": "3",
            "REFLADE_STORAGE_READ_TIMEOUT_S": "2.5",
            "REFLADE_RAY_NUM_CPUS": "none",
        },
    )
    assert cfg.storage.max_attempts == 3 and type(cfg.storage.max_attempts) is int
    assert cfg.storage.read_timeout_s == 2.5
    assert cfg.ray.num_cpus is None


def test_env_value_of_the_wrong_type_names_the_variable():
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"REFLADE_STORAGE_MAX_ATTEMPTS": "abc"})
    assert "REFLADE_STORAGE_MAX_ATTEMPTS" in str(e.value)
    assert "abc" in str(e.value)


def test_yaml_value_of_the_wrong_type_names_the_key(tmp_path):
    f = _write(tmp_path / "c.yaml", "storage: {max_attempts: true}\n")
    with pytest.raises(ConfigError, match=r"storage\.max_attempts"):
        load_config(f, env={})


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_yaml_key_names_it_and_the_known_keys(tmp_path):
    f = _write(tmp_path / "c.yaml", "storage: {buckett: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    msg = str(e.value)
    assert "storage.buckett" in msg
    for known in ("endpoint", "bucket", "region", "access_key_id", "max_attempts"):
        assert known in msg


def test_unknown_yaml_section_lists_the_sections(tmp_path):
    f = _write(tmp_path / "c.yaml", "storrage: {bucket: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, env={})
    msg = str(e.value)
    assert "storrage" in msg
    for known in ("storage", "ray", "registry", "stack"):
        assert known in msg


def test_unknown_reflade_section_variable_is_an_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"REFLADE_FOO_BAR": "1"})
    msg = str(e.value)
    assert "REFLADE_FOO_BAR" in msg
    assert "storage" in msg and "registry" in msg


def test_unknown_reflade_field_variable_names_it():
    with pytest.raises(ConfigError) as e:
        load_config(None, env={"REFLADE_STORAGE_BUKET": "x"})
    msg = str(e.value)
    assert "REFLADE_STORAGE_BUKET" in msg
    assert "storage.buket" in msg and "bucket" in msg


@pytest.mark.parametrize(
    "text",
    ["- storage\n- ray\n", "just a string\n", "[]\n", "storage: 5\n"],
    ids=["list", "scalar", "empty-list", "section-not-mapping"],
)
def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path / "c.yaml", text), env={})


def test_invalid_yaml_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "c.yaml", "storage: {bucket: [unclosed\n"), env={})


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, env={"REFLADE_CONFIG": str(tmp_path / "nope.yaml")})


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path, env={})  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(binary, env={})


@pytest.mark.parametrize("bucket", ["ab", "x" * 64])
def test_bucket_name_length_is_validated(bucket):
    with pytest.raises(ConfigError, match="3 to 63"):
        load_config(None, env={"REFLADE_STORAGE_BUCKET": bucket})
    with pytest.raises(ConfigError):
        StorageConfig(bucket=bucket).validate()


def test_endpoint_needs_a_scheme():
    with pytest.raises(ConfigError, match="storage.endpoint"):
        load_config(None, env={"REFLADE_STORAGE_ENDPOINT": "127.0.0.1:8333"})


# ---------------------------------------------------------------------------------------------- stack port
def test_stack_s3_port_alone_moves_the_endpoint(tmp_path):
    assert (
        load_config(None, env={"REFLADE_STACK_S3_PORT": "9444"}).storage.endpoint == "http://127.0.0.1:9444"
    )
    f = _write(tmp_path / "c.yaml", "stack: {s3_port: 9555}\n")
    assert load_config(f, env={}).storage.endpoint == "http://127.0.0.1:9555"
    # The environment's port beats the file's, for the endpoint as for the server.
    assert load_config(f, env={"REFLADE_STACK_S3_PORT": "9666"}).storage.endpoint == "http://127.0.0.1:9666"


@pytest.mark.parametrize(
    "source",
    ["REFLADE_STORAGE_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "file"],
)
def test_an_explicit_endpoint_is_kept_whatever_the_stack_port(tmp_path, source):
    env = {"REFLADE_STACK_S3_PORT": "9444"}
    path = None
    if source == "file":
        path = _write(tmp_path / "c.yaml", "storage: {endpoint: 'http://s3.example:9000'}\n")
    else:
        env[source] = "http://s3.example:9000"
    cfg = load_config(path, env=env)
    assert cfg.storage.endpoint == "http://s3.example:9000" and cfg.stack.s3_port == 9444


def test_up_s3_port_option_moves_the_endpoint(clean_environ, tmp_path):
    clean_environ.setenv("REFLADE_HOME", str(tmp_path))
    cli.STATE.config_path, cli.STATE._config = None, None
    cfg = cli._stack_overrides(None, 9777, None, None, None)
    assert cfg.storage.endpoint == "http://127.0.0.1:9777" and cfg.stack.s3_port == 9777


def test_config_show_follows_the_stack_port_in_a_subprocess(tmp_path):
    proc = subprocess.run(
        [str(REFLADE), "config", "show", "--json"],
        capture_output=True,
        text=True,
        env=_clean_env(REFLADE_STACK_S3_PORT="9888", REFLADE_HOME=str(tmp_path)),
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["storage"]["endpoint"] == "http://127.0.0.1:9888"


# ---------------------------------------------------------------------------------------------- config show
def test_config_show_masks_secrets_in_process(clean_environ, capsys):
    clean_environ.setenv("AWS_ACCESS_KEY_ID", "AKIDSHOWN")
    clean_environ.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    clean_environ.setenv("REFLADE_STORAGE_SESSION_TOKEN", SECRET + "-token")

    assert cli.main(["config", "show"]) == 0
    out, err = capsys.readouterr()
    assert "****" in out
    assert SECRET not in out and SECRET not in err
    assert "bucket: reflade" in out

    assert cli.main(["config", "show", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    storage = data["config"]["storage"]
    assert storage["secret_access_key"] == "****"
    assert storage["session_token"] == "****"
    assert storage["access_key_id"] == "****"
    assert storage["bucket"] == "reflade"
    assert data["source_file"] is None
    assert SECRET not in out and SECRET not in err


def test_config_show_with_a_file_in_a_subprocess(tmp_path):
    f = _write(tmp_path / "c.yaml", f"storage: {{bucket: sub-bucket, secret_access_key: {SECRET}}}\n")
    env = _clean_env(AWS_SECRET_ACCESS_KEY=SECRET + "-aws")
    proc = subprocess.run(
        [str(REFLADE), "--config", str(f), "config", "show", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["source_file"] == str(f)
    assert data["config"]["storage"]["bucket"] == "sub-bucket"
    assert data["config"]["storage"]["secret_access_key"] == "****"


def test_cli_config_error_is_one_line_and_exit_1(tmp_path):
    f = _write(tmp_path / "c.yaml", "storage: {buckett: x}\n")
    proc = subprocess.run(
        [str(REFLADE), "--config", str(f), "config", "show"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "ConfigError" in proc.stderr and "storage.buckett" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- plug-ins
PLUGIN_MODULE = """\
from dataclasses import dataclass

import typer


@dataclass
class FakeSection:
    threshold: float = 0.5


fake_app = typer.Typer()


@fake_app.command()
def hello() -> None:
    print("hello from plugin")


def job(argv):
    print("fake job", argv)
    return 0
"""

PLUGIN_ENTRY_POINTS = """\
[reflade.config]
fake = rlfake_plugin:FakeSection

[reflade.commands]
fake = rlfake_plugin:fake_app

[reflade.jobs]
fakejob = rlfake_plugin:job
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A directory holding a fake distribution ``rlfake`` that plugs into all three groups."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "rlfake_plugin.py").write_text(PLUGIN_MODULE)
    dist = root / "rlfake-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rlfake\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    return root


def _run_with_plugin(plugin_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=_clean_env(PYTHONPATH=str(plugin_path), **env),
        cwd=plugin_path,
        timeout=120,
    )


def test_plugin_config_section_defaults_and_env(plugin_path):
    proc = _run_with_plugin(plugin_path, [str(REFLADE), "config", "show", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["fake"] == {"threshold": 0.5}

    proc = _run_with_plugin(
        plugin_path, [str(REFLADE), "config", "show", "--json"], REFLADE_FAKE_THRESHOLD="0.75"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["fake"]["threshold"] == 0.75


def test_plugin_config_section_from_yaml(plugin_path, tmp_path):
    good = _write(tmp_path / "good.yaml", "fake: {threshold: 0.25}\n")
    proc = _run_with_plugin(plugin_path, [str(REFLADE), "--config", str(good), "config", "show", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["fake"]["threshold"] == 0.25

    bad = _write(tmp_path / "bad.yaml", "fake: {nope: 1}\n")
    proc = _run_with_plugin(plugin_path, [str(REFLADE), "--config", str(bad), "config", "show"])
    assert proc.returncode == 1
    assert "ConfigError" in proc.stderr
    assert "fake.nope" in proc.stderr and "threshold" in proc.stderr


def test_plugin_bad_env_value_names_the_variable(plugin_path):
    proc = _run_with_plugin(plugin_path, [str(REFLADE), "config", "show"], REFLADE_FAKE_THRESHOLD="high")
    assert proc.returncode == 1
    assert "REFLADE_FAKE_THRESHOLD" in proc.stderr


def test_plugin_command(plugin_path):
    proc = _run_with_plugin(plugin_path, [str(REFLADE), "fake", "hello"])
    assert proc.returncode == 0, proc.stderr
    assert "hello from plugin" in proc.stdout
    assert "warning" not in proc.stderr

    proc = _run_with_plugin(plugin_path, [str(REFLADE), "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "fake" in proc.stdout


def test_main_called_twice_in_one_process_loads_plugins_once(plugin_path):
    code = (
        "import sys\n"
        "from reflade.platform.cli import main\n"
        "sys.exit(main(['fake', 'hello']) or main(['fake', 'hello']))\n"
    )
    proc = _run_with_plugin(plugin_path, [sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("hello from plugin") == 2
    assert "clashes" not in proc.stderr and "warning" not in proc.stderr


def test_plugin_job_kind_is_listed_and_runs(plugin_path):
    proc = _run_with_plugin(plugin_path, [str(REFLADE), "jobs", "kinds", "--json"])
    assert proc.returncode == 0, proc.stderr
    kinds = json.loads(proc.stdout)
    assert kinds["fakejob"] == "rlfake_plugin:job"
    assert {"doctor", "registry"} <= set(kinds)

    proc = _run_with_plugin(
        plugin_path, [sys.executable, "-m", "reflade.platform.jobrunner", "fakejob", "a", "b"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "fake job ['a', 'b']" in proc.stdout


def test_jobrunner_unknown_kind_lists_known_kinds(plugin_path):
    proc = _run_with_plugin(
        plugin_path, [sys.executable, "-m", "reflade.platform.jobrunner", "nosuchkind", "x"]
    )
    assert proc.returncode == 2
    assert "nosuchkind" in proc.stderr
    for known in ("fakejob", "doctor", "registry"):
        assert known in proc.stderr

    proc = _run_with_plugin(plugin_path, [sys.executable, "-m", "reflade.platform.jobrunner"])
    assert proc.returncode == 2
    assert "fakejob" in proc.stderr
