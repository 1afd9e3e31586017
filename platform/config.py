"""One configuration for the whole platform: dataclass sections, one loader.

Sources, lowest precedence first:

1. the defaults of each section (they describe the embedded stack that ``reflade up`` starts);
2. a YAML file, from ``--config`` or ``REFLADE_CONFIG``;
3. environment variables ``REFLADE_<SECTION>_<FIELD>`` (e.g. ``REFLADE_STORAGE_BUCKET``), and the standard
   ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_ENDPOINT_URL`` /
   ``AWS_DEFAULT_REGION`` for the object store.

``platform`` owns the sections ``storage``, ``ray``, ``registry`` and ``stack``. Every other package declares
its section as a dataclass and registers it under the entry-point group ``reflade.config`` (name = the YAML
top-level key). Unknown keys, in the file or in ``REFLADE_*`` variables, are errors that name the key and the
known ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

CONFIG_ENV = "REFLADE_CONFIG"
HOME_ENV = "REFLADE_HOME"
# REFLADE_* variables that are not configuration sections.
_RESERVED_ENV = {"CONFIG", "HOME"}
MASK = "****"


class ConfigError(ValueError):
    """A configuration source is invalid: unknown key, bad value, unreadable file."""


def _secret(default: Any = None) -> Any:
    return field(default=default, metadata={"secret": True}, repr=False)


def default_state_dir() -> Path:
    """Where ``reflade up`` keeps its credentials, logs and data (``$REFLADE_HOME`` or ``~/.reflade``)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".reflade").expanduser()


@dataclass(kw_only=True)
class StorageConfig:
    """The S3-compatible object store every package reads and writes."""

    endpoint: str = "http://127.0.0.1:8333"
    """S3 endpoint URL (scheme, host, port); unless set, the embedded stack's (``stack.host``:``stack.s3_port``)."""
    bucket: str = "reflade"
    """Bucket holding the registry, raw inputs and run outputs (3-63 characters)."""
    region: str = "us-east-1"
    """Signing region."""
    access_key_id: str | None = _secret()
    """Access key; None means: AWS_* variables, then the credentials file, then the embedded stack's."""
    secret_access_key: str | None = _secret()
    """Secret key (never printed)."""
    session_token: str | None = _secret()
    """Optional STS session token."""
    credentials_file: str | None = None
    """INI file of AWS shared credentials (mode 0600); also read from AWS_SHARED_CREDENTIALS_FILE."""
    profile: str = "default"
    """Profile inside the credentials file."""
    max_attempts: int = 10
    """Attempts per request, first included, on throttling (SlowDown), 5xx and network errors."""
    connect_timeout_s: float = 5.0
    """TCP connect timeout per attempt, seconds."""
    read_timeout_s: float = 60.0
    """Socket read timeout per attempt, seconds."""
    multipart_threshold_mb: int = 16
    """Files at least this large go up and down in parts."""
    multipart_chunk_mb: int = 8
    """Part size of multipart transfers, MiB."""
    max_concurrency: int = 4
    """Parallel parts per multipart transfer."""

    def validate(self) -> None:
        if not (3 <= len(self.bucket) <= 63):
            raise ConfigError(f"storage.bucket {self.bucket!r}: S3 bucket names need 3 to 63 characters")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"storage.endpoint {self.endpoint!r}: expected http://HOST:PORT or https://HOST"
            )
        if self.max_attempts < 1:
            raise ConfigError("storage.max_attempts must be at least 1")


@dataclass(kw_only=True)
class RayConfig:
    """How to reach Ray."""

    address: str | None = None
    """Ray address (``ray://host:10001``, ``host:6379``, ``auto``); None: the embedded head if up, else a local one."""
    dashboard_url: str | None = None
    """Job-submission URL (``http://host:8265``); None: the embedded head's."""
    namespace: str = "reflade"
    """Ray namespace for named actors and Serve."""
    num_cpus: int | None = None
    """CPUs of a local cluster started in-process (None: all)."""


@dataclass(kw_only=True)
class RegistryConfig:
    """Where the artifact registry lives inside the bucket."""

    prefix: str = "registry"
    """Key prefix of the registry inside ``storage.bucket``."""
    gc_grace_s: int = 3600
    """``registry gc`` leaves unreferenced files younger than this alone (an import may still be running)."""


@dataclass(kw_only=True)
class StackConfig:
    """The embedded stack of ``reflade up``: SeaweedFS and a Ray head on this machine."""

    state_dir: str = ""
    """Credentials, logs and data; empty means ``$REFLADE_HOME`` or ``~/.reflade``."""
    host: str = "127.0.0.1"
    """Interface the servers bind to."""
    s3_port: int = 8333
    """SeaweedFS S3 port; SeaweedFS also binds s3_port+1 .. s3_port+5 and the same ports + 10000 (gRPC)."""
    ray_port: int = 6379
    """Ray GCS port."""
    dashboard_port: int = 8265
    """Ray dashboard and job-submission port."""
    ray_client_port: int = 10001
    """Ray client server port (``ray://`` addresses)."""
    dashboard_agent_port: int = 52465
    """Ray dashboard agent HTTP port (not Ray's default 52365, which any `ray.init()` on this machine takes)."""
    runtime_env_agent_port: int = 52466
    """Ray runtime-env agent port."""
    metrics_export_port: int = 52467
    """Ray metrics export port."""
    serve_port: int = 8000
    """HTTP port of the decomposition service (Ray Serve's proxy, `reflade serve up`), on ``host``; `reflade up`
    checks it is free with the others."""
    ray_num_cpus: int | None = None
    """CPUs the Ray head offers (None: all)."""
    start_timeout_s: float = 60.0
    """How long to wait for each server to answer."""

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()


PLATFORM_SECTIONS: dict[str, type] = {
    "storage": StorageConfig,
    "ray": RayConfig,
    "registry": RegistryConfig,
    "stack": StackConfig,
}


def plugin_sections() -> dict[str, type]:
    """Sections other packages register under the entry-point group ``reflade.config``."""
    found: dict[str, type] = {}
    for ep in entry_points(group="reflade.config"):
        if ep.name in PLATFORM_SECTIONS:
            raise ConfigError(f"package {ep.value!r} registers section {ep.name!r}, which platform owns")
        cls = ep.load()
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config section {ep.name!r} ({ep.value}) is not a dataclass")
        found[ep.name] = cls
    return found


@dataclass
class Config:
    """The effective configuration: one dataclass instance per section."""

    sections: dict[str, Any]
    source_file: str | None = None
    explicit: set[str] = field(default_factory=set)
    """``section.key`` names set by the file or the environment (the rest are defaults)."""

    def follow_stack(self) -> None:
        """Point ``storage.endpoint`` at the embedded stack's S3 port, unless the endpoint was set explicitly.

        So ``REFLADE_STACK_S3_PORT`` (or ``stack.s3_port``, or ``reflade up --s3-port``) alone moves the whole
        stack: the server and every client of it.
        """
        if "storage.endpoint" not in self.explicit:
            self.storage.endpoint = f"http://{self.stack.host}:{self.stack.s3_port}"

    @property
    def storage(self) -> StorageConfig:
        return self.sections["storage"]

    @property
    def ray(self) -> RayConfig:
        return self.sections["ray"]

    @property
    def registry(self) -> RegistryConfig:
        return self.sections["registry"]

    @property
    def stack(self) -> StackConfig:
        return self.sections["stack"]

    def section(self, name: str) -> Any:
        try:
            return self.sections[name]
        except KeyError:
            raise ConfigError(
                f"no configuration section {name!r} (sections: {', '.join(sorted(self.sections))})"
            ) from None

    def to_dict(self, *, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, obj in self.sections.items():
            values = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if mask_secrets and f.metadata.get("secret") and v:
                    v = MASK
                values[f.name] = v
            out[name] = values
        return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML or environment value to the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return _coerce(value, args[0], where)
    if value is None:
        raise ConfigError(f"{where}: a value is required")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin is list:
            (item,) = typing.get_args(typ) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [_coerce(v, item, where) for v in value]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{where}: cannot read {value!r} as {name}") from None
    return value


def _apply(
    section: str, obj: Any, values: dict[str, Any], source: str, explicit: set[str] | None = None
) -> None:
    types_ = _field_types(type(obj))
    known = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(
                f"{source}: unknown key {section}.{key} (known keys of {section}: {', '.join(known)})"
            )
        setattr(obj, key, _coerce(value, types_[key], f"{source}: {section}.{key}"))
        if explicit is not None:
            explicit.add(f"{section}.{key}")


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Build the effective configuration.

    Args:
        path: YAML file; None means ``$REFLADE_CONFIG`` if set, else no file.
        env: environment to read (default ``os.environ``).

    Raises:
        ConfigError: unreadable file, unknown section or key, value of the wrong type.
    """
    env = dict(os.environ if env is None else env)
    classes = dict(PLATFORM_SECTIONS)
    classes.update(plugin_sections())
    sections = {name: cls() for name, cls in classes.items()}
    explicit: set[str] = set()

    path = path or env.get(CONFIG_ENV) or None
    if path:
        p = Path(path).expanduser()
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8 text
            raise ConfigError(f"config file {p} cannot be read: {e}") from None
        if data is None:  # an empty file (a falsy non-mapping such as [] is still an error below)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping of sections at the top level")
        for name, values in data.items():
            if name not in sections:
                raise ConfigError(
                    f"config file {p}: unknown section {name!r} (known sections: {', '.join(sorted(sections))})"
                )
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config file {p}: section {name!r} must be a mapping")
            _apply(name, sections[name], values, f"config file {p}", explicit)

    # Standard AWS variables sit between the file and REFLADE_* variables.
    storage = sections["storage"]
    aws = {
        "AWS_ACCESS_KEY_ID": "access_key_id",
        "AWS_SECRET_ACCESS_KEY": "secret_access_key",
        "AWS_SESSION_TOKEN": "session_token",
        "AWS_ENDPOINT_URL_S3": "endpoint",
        "AWS_ENDPOINT_URL": "endpoint",
        "AWS_DEFAULT_REGION": "region",
        "AWS_SHARED_CREDENTIALS_FILE": "credentials_file",
        "AWS_PROFILE": "profile",
    }
    seen: set[str] = set()
    for var, key in aws.items():
        if env.get(var) and key not in seen:
            setattr(storage, key, env[var])
            seen.add(key)
            explicit.add(f"storage.{key}")

    for var in sorted(env):
        if not var.startswith("REFLADE_"):
            continue
        rest = var[len("REFLADE_") :]
        if rest in _RESERVED_ENV:
            continue
        sec, _, key = rest.partition("_")
        sec, key = sec.lower(), key.lower()
        if sec not in sections or not key:
            raise ConfigError(
                f"environment variable {var}: unknown section {sec!r} "
                f"(expected REFLADE_<SECTION>_<FIELD> with a section among {', '.join(sorted(sections))})"
            )
        _apply(sec, sections[sec], {key: env[var]}, f"environment variable {var}", explicit)

    cfg = Config(sections=sections, source_file=str(path) if path else None, explicit=explicit)
    cfg.follow_stack()
    for obj in sections.values():
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    return cfg
