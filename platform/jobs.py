"""Ray jobs: ``reflade jobs submit KIND -- ARGS`` runs the ``reflade.jobs`` entry point KIND on a cluster.

The package ships with the job as a wheel in ``runtime_env["py_modules"]`` because ``reflade.*`` exists only
as an installed distribution (the top folders have no ``__init__.py``), so a bare ``working_dir`` would not
make it importable. Ray installs a py_modules wheel with ``pip install --target``, dependencies included, so
the shipped wheel carries no ``Requires-Dist``: the cluster provides the stack (Ray, torch, ...), the wheel
provides this project's code and entry points.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from reflade.platform.cluster import auth_token, check_no_secrets, dashboard_url, worker_env_vars
from reflade.platform.config import Config


class JobError(RuntimeError):
    """A job cannot be submitted or found."""


def job_kinds() -> dict[str, str]:
    """Registered job kinds: name -> ``module:function``."""
    return {ep.name: ep.value for ep in entry_points(group="reflade.jobs")}


def project_root() -> Path | None:
    """The source tree this package was installed from (editable installs), if there is one."""
    import reflade.platform as here

    root = Path(next(iter(here.__path__))).resolve().parent
    return root if (root / "pyproject.toml").exists() and (root / "platform").is_dir() else None


def _source_digest(root: Path) -> str:
    h = hashlib.sha256()
    for folder in ("platform", "engine", "train", "serve", "eval"):
        for p in sorted((root / folder).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
    h.update((root / "pyproject.toml").read_bytes())
    return h.hexdigest()[:16]


def _strip_requirements(wheel: Path) -> None:
    """Remove Requires-Dist from a wheel's METADATA (and fix its RECORD line) in place."""
    with zipfile.ZipFile(wheel) as zin:
        items = [(info, zin.read(info.filename)) for info in zin.infolist()]
    meta_name = next(i.filename for i, _ in items if i.filename.endswith(".dist-info/METADATA"))
    record_name = next(i.filename for i, _ in items if i.filename.endswith(".dist-info/RECORD"))
    out_items = []
    new_meta = b""
    for info, data in items:
        if info.filename == meta_name:
            lines = data.decode().split("\n")
            data = "\n".join(line for line in lines if not line.startswith("Requires-Dist:")).encode()
            new_meta = data
        out_items.append((info, data))
    digest = base64.urlsafe_b64encode(hashlib.sha256(new_meta).digest()).rstrip(b"=").decode()
    final = []
    for info, data in out_items:
        if info.filename == record_name:
            rows = []
            for row in data.decode().splitlines():
                if row.startswith(meta_name + ","):
                    row = f"{meta_name},sha256={digest},{len(new_meta)}"
                rows.append(row)
            data = ("\n".join(rows) + "\n").encode()
        final.append((info, data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in final:
            zout.writestr(info, data)
    wheel.write_bytes(buf.getvalue())


def wheel_cache_dir() -> Path:
    """This user's cache of built wheels: ``$XDG_CACHE_HOME/reflade/wheels``, else ``~/.cache/reflade/wheels``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "reflade" / "wheels"


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check an existing one, before anything in it is trusted.

    The wheel cache's content is shipped to the cluster and run there, so it must be this user's alone: an
    existing directory that is group- or world-writable (anyone could have planted a wheel) is emptied and
    recreated with mode 0700; one that is merely readable by others gets mode 0700.

    Raises:
        JobError: ``path`` is a symbolic link or not a directory, or belongs to another user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise JobError(f"wheel cache {path} is not a directory (a symbolic link?); remove it")
    if st.st_uid != os.getuid():
        raise JobError(
            f"wheel cache {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); what it holds "
            f"would run on the cluster: remove it, or set XDG_CACHE_HOME to a directory of your own"
        )
    if st.st_mode & 0o022:
        shutil.rmtree(path)
        os.mkdir(path, 0o700)
    elif stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _trusted_wheel(path: Path) -> bool:
    """A cached wheel is reused only if it is a regular file of this user that nobody else can write."""
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _pip_wheel(root: Path, build_dir: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            build_dir,
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise JobError(f"building the wheel failed:\n{proc.stderr[-2000:]}")


def build_wheel(out_dir: Path | None = None, *, strip_requirements: bool = True) -> Path:
    """Build this project's wheel (cached by source digest) for shipping to a cluster.

    Args:
        out_dir: the cache (default ``wheel_cache_dir()``, per user, mode 0700; checked by ``private_dir``).

    Raises:
        JobError: no source tree (installed from a wheel: reinstall editable or pass the wheel), a cache that is
            not this user's alone, or a build failure.
    """
    root = project_root()
    if root is None:
        raise JobError(
            "cannot find the RefLade source tree to build a wheel from; install it with `pip install -e`"
        )
    cache = private_dir(Path(out_dir) if out_dir else wheel_cache_dir())
    out_dir = private_dir(cache / _source_digest(root))
    found = sorted(out_dir.glob("reflade-*.whl"))
    if found and _trusted_wheel(found[-1]):
        return found[-1]
    for stale in found:
        stale.unlink()
    # Built inside the cache: the final rename stays on one filesystem and never passes through /tmp.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as build_dir:
        _pip_wheel(root, build_dir)
        wheel = next(Path(build_dir).glob("reflade-*.whl"))
        if strip_requirements:
            _strip_requirements(wheel)
        os.chmod(wheel, 0o600)
        target = out_dir / wheel.name
        wheel.replace(target)
    return target


class Jobs:
    """Ray's job-submission API for one configuration, with the token of a token-authenticated head."""

    def __init__(self, cfg: Config):
        from ray.job_submission import JobSubmissionClient

        self.cfg = cfg
        self.url = dashboard_url(cfg)
        token = auth_token(cfg)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self.client = JobSubmissionClient(self.url, headers=headers)
        except Exception as e:  # ray raises ConnectionError/RuntimeError/AuthenticationError variants
            raise JobError(f"cannot reach the Ray job API at {self.url}: {_first_line(e)}") from None

    def submit(
        self, kind: str, args: list[str], *, submission_id: str | None = None, wheel: Path | None = None
    ) -> str:
        """Submit job KIND with ARGS; returns the job id.

        Raises:
            JobError: unknown kind (the message lists the known ones), wheel build failure.
        """
        kinds = job_kinds()
        if kind not in kinds:
            raise JobError(f"unknown job kind {kind!r} (known: {', '.join(sorted(kinds)) or 'none'})")
        wheel = wheel or build_wheel()
        runtime_env: dict[str, Any] = {"py_modules": [str(wheel)], "env_vars": worker_env_vars(self.cfg)}
        check_no_secrets(runtime_env)
        entrypoint = shlex.join(["python", "-m", "reflade.platform.jobrunner", kind, *args])
        return self.client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata={"reflade_kind": kind},
        )

    def status(self, job_id: str) -> dict[str, Any]:
        info = self._info(job_id)
        return {
            "job_id": job_id,
            "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "entrypoint": info.entrypoint,
            "message": info.message,
            "start_time": info.start_time,
            "end_time": info.end_time,
            "metadata": info.metadata,
        }

    def _info(self, job_id: str):
        try:
            return self.client.get_job_info(job_id)
        except RuntimeError as e:
            raise JobError(f"no job {job_id!r} at {self.url}: {_first_line(e)}") from None

    def list(self) -> list[dict[str, Any]]:
        out = []
        for info in self.client.list_jobs():
            out.append(
                {
                    "job_id": info.submission_id or info.job_id,
                    "status": str(info.status.value),
                    "entrypoint": info.entrypoint,
                    "start_time": info.start_time,
                }
            )
        return out

    def logs(self, job_id: str) -> str:
        self._info(job_id)
        return self.client.get_job_logs(job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """Log lines as they come, until the job ends."""
        import asyncio

        self._info(job_id)

        async def gen(queue: list[str]):
            async for chunk in self.client.tail_job_logs(job_id):
                queue.append(chunk)

        # tail_job_logs is async; drain it in a private event loop and hand chunks over as they arrive.
        loop = asyncio.new_event_loop()
        queue: list[str] = []
        task = loop.create_task(gen(queue))
        try:
            while not task.done():
                loop.run_until_complete(asyncio.wait([task], timeout=0.5))
                while queue:
                    yield queue.pop(0)
            while queue:
                yield queue.pop(0)
            task.result()
        finally:
            if not task.done():
                task.cancel()
            loop.close()

    def stop(self, job_id: str) -> bool:
        self._info(job_id)
        return self.client.stop_job(job_id)

    def wait(self, job_id: str, timeout: float = 600.0) -> str:
        """Block until the job ends; returns its final status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(job_id)["status"]
            if st in ("SUCCEEDED", "FAILED", "STOPPED"):
                return st
            time.sleep(0.5)
        raise JobError(f"job {job_id} did not finish within {timeout:.0f} s")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
