"""The CLI as a user runs it: `reflade up`, `status`, `registry ...`, `jobs ...`, `down`, against a real
SeaweedFS and a real Ray head (token auth on) started by `reflade up` with its own state directory and ports.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from reflade.platform.stack import find_free_base_port, port_in_use
from reflade.platform.storage import read_credentials_file

REFLADE = str(Path(sys.executable).parent / "reflade")
pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin_dir(root: Path) -> Path:
    """A distribution on PYTHONPATH that adds a `sleep` job kind (a job long enough to stop)."""
    d = root / "plugin"
    (d / "rltest_jobs-0.1.dist-info").mkdir(parents=True)
    (d / "rltest_jobs-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rltest-jobs\nVersion: 0.1\n"
    )
    (d / "rltest_jobs-0.1.dist-info" / "entry_points.txt").write_text(
        "[reflade.jobs]\nsleep = rltest_jobs:sleep\n"
    )
    (d / "rltest_jobs.py").write_text(
        textwrap.dedent(
            """
            import time

            def sleep(argv):
                print("sleeping", argv, flush=True)
                time.sleep(float(argv[0]) if argv else 120)
                return 0
            """
        )
    )
    return d


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-stack")
    state = root / "state"
    s3 = find_free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REFLADE_", "RAY_ADDRESS"))}
    env.update(
        REFLADE_HOME=str(state),
        REFLADE_STACK_S3_PORT=str(s3),  # alone: the storage endpoint follows it
        REFLADE_STACK_RAY_PORT=str(_free_port()),
        REFLADE_STACK_DASHBOARD_PORT=str(_free_port()),
        REFLADE_STACK_RAY_CLIENT_PORT=str(_free_port()),
        REFLADE_STACK_DASHBOARD_AGENT_PORT=str(_free_port()),
        REFLADE_STACK_RUNTIME_ENV_AGENT_PORT=str(_free_port()),
        REFLADE_STACK_METRICS_EXPORT_PORT=str(_free_port()),
        REFLADE_STACK_SERVE_PORT=str(_free_port()),
        REFLADE_STACK_RAY_NUM_CPUS="2",
        PYTHONPATH=str(_plugin_dir(root)),
        COLUMNS="200",
    )

    def run(*args, check=True, extra_env=None, timeout=300):
        proc = subprocess.run(
            [REFLADE, *args],
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=root,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"reflade {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    up = run("up")
    info = {"root": root, "state": state, "env": env, "run": run, "s3_port": s3, "up": up}
    yield info
    run("down", check=False)


def test_up_starts_both_with_private_credentials(stack):
    state = stack["state"]
    assert "token auth on" in stack["up"].stdout
    for name in ("aws_credentials", "ray_auth_token", "stack.json", "s3_identities.json"):
        mode = stat.S_IMODE((state / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    creds = read_credentials_file(state / "aws_credentials")
    assert creds is not None and len(creds.secret_access_key) >= 30
    # Never printed.
    assert creds.secret_access_key not in stack["up"].stdout + stack["up"].stderr
    # The S3 server is not open: an anonymous request is refused.
    r = requests.put(f"http://127.0.0.1:{stack['s3_port']}/anonymous-bucket", timeout=5)
    assert r.status_code in (401, 403)
    r = requests.get(f"http://127.0.0.1:{stack['s3_port']}/reflade", timeout=5)
    assert r.status_code in (401, 403)


def test_status_reports_both_answering(stack):
    st = json.loads(stack["run"]("status", "--json").stdout)
    assert st["running"] and st["healthy"]
    assert st["object_store"]["s3"] == "answering"
    assert st["ray"]["dashboard"] == "answering" and st["ray"]["auth"] == "token"
    table = stack["run"]("status").stdout
    assert "SeaweedFS" in table and "Ray head" in table


def test_ray_head_requires_the_token(stack):
    state = json.loads((stack["state"] / "stack.json").read_text())
    url = state["ray"]["dashboard_url"]
    assert requests.get(f"{url}/api/jobs/", timeout=5).status_code == 401
    token = (stack["state"] / "ray_auth_token").read_text().strip()
    ok = requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert ok.status_code == 200


def test_second_up_is_idempotent(stack):
    out = stack["run"]("up").stdout
    assert "already running" in out


def test_port_taken_is_named(stack, tmp_path):
    fresh_ray = {
        f"REFLADE_STACK_{k}": str(_free_port())
        for k in (
            "RAY_PORT",
            "DASHBOARD_PORT",
            "RAY_CLIENT_PORT",
            "DASHBOARD_AGENT_PORT",
            "RUNTIME_ENV_AGENT_PORT",
            "METRICS_EXPORT_PORT",
            "SERVE_PORT",
        )
    }
    proc = stack["run"]("up", "--state-dir", str(tmp_path / "a"), check=False, extra_env=fresh_ray)
    assert proc.returncode == 1
    assert f"port {stack['s3_port']} (s3) on 127.0.0.1 is already in use" in proc.stderr
    assert not (tmp_path / "a" / "stack.json").exists()

    taken_dashboard = stack["env"]["REFLADE_STACK_DASHBOARD_PORT"]
    fresh_ray["REFLADE_STACK_DASHBOARD_PORT"] = taken_dashboard
    proc = stack["run"](
        "up",
        "--state-dir",
        str(tmp_path / "b"),
        "--s3-port",
        str(find_free_base_port()),
        check=False,
        extra_env=fresh_ray,
    )
    assert proc.returncode == 1
    assert f"port {taken_dashboard} (Ray dashboard) on 127.0.0.1 is already in use" in proc.stderr
    assert not (tmp_path / "b" / "stack.json").exists()

    # the decomposition service's port is checked with the others, before anything starts
    fresh_ray["REFLADE_STACK_DASHBOARD_PORT"] = str(_free_port())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        fresh_ray["REFLADE_STACK_SERVE_PORT"] = str(held.getsockname()[1])
        proc = stack["run"](
            "up",
            "--state-dir",
            str(tmp_path / "c"),
            "--s3-port",
            str(find_free_base_port()),
            check=False,
            extra_env=fresh_ray,
        )
    assert proc.returncode == 1
    assert (
        f"port {fresh_ray['REFLADE_STACK_SERVE_PORT']} (Ray Serve HTTP) on 127.0.0.1 is already in use"
        in proc.stderr
    )
    assert not (tmp_path / "c" / "stack.json").exists()


def test_registry_commands_as_a_user(stack, tmp_path):
    run = stack["run"]
    model = tmp_path / "ckpt"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "Demo"}')
    (model / "unet" / "weights.bin").write_bytes(os.urandom(300_000))
    out = run(
        "registry",
        "import",
        "weights",
        "demo-ckpt",
        str(model),
        "--license",
        "Apache-2.0",
        "--source",
        "https://example.org/ckpt",
        "--json",
    ).stdout
    made = json.loads(out)
    assert made["ref"] == "weights/demo-ckpt@1" and made["files"] == 2 and not made["reused"]
    again = json.loads(run("registry", "import", "weights", "demo-ckpt", str(model), "--json").stdout)
    assert again["reused"] and again["ref"] == "weights/demo-ckpt@1"
    assert (
        "already registered as weights/demo-ckpt@1"
        in run("registry", "import", "weights", "demo-ckpt", str(model)).stdout
    )

    single = tmp_path / "note.txt"
    single.write_text("v2")
    run(
        "registry",
        "import",
        "model",
        "demo-model",
        str(single),
        "--parent",
        "weights/demo-ckpt",
        "--alias",
        "candidate",
    )

    rows = json.loads(run("registry", "ls", "--json").stdout)
    refs = {r["ref"]: r for r in rows}
    assert refs["weights/demo-ckpt"]["latest"] == 1
    assert refs["model/demo-model"]["aliases"] == {"candidate": 1}
    assert "weights/demo-ckpt" in run("registry", "ls").stdout
    assert [r["ref"] for r in json.loads(run("registry", "ls", "model", "--json").stdout)] == [
        "model/demo-model"
    ]

    shown = json.loads(run("registry", "show", "weights/demo-ckpt@1", "--json").stdout)
    assert shown["license"] == "Apache-2.0" and shown["source"] == "https://example.org/ckpt"
    assert {f["path"] for f in shown["files"]} == {"model_index.json", "unet/weights.bin"}
    assert all(u.startswith("s3://reflade/") for u in shown["uris"])
    assert "Apache-2.0" in run("registry", "show", "weights/demo-ckpt").stdout

    dest = tmp_path / "dl"
    run("registry", "download", "weights/demo-ckpt@1", str(dest))
    assert (dest / "unet" / "weights.bin").read_bytes() == (model / "unet" / "weights.bin").read_bytes()

    lineage = json.loads(run("registry", "lineage", "weights/demo-ckpt", "--json").stdout)
    assert [c["ref"] for c in lineage["children"]] == ["model/demo-model@1"]
    assert "model/demo-model@1" in run("registry", "lineage", "weights/demo-ckpt").stdout

    run("registry", "alias", "model/demo-model@1", "production")
    hist = json.loads(run("registry", "history", "model/demo-model", "production", "--json").stdout)
    assert hist[-1]["to"] == 1 and hist[-1]["from"] is None

    bad = run("registry", "import", "weights", "../etc", str(single), check=False)
    assert bad.returncode == 1 and "invalid name '../etc'" in bad.stderr
    missing = run("registry", "show", "model/demo-model@nope", check=False)
    assert missing.returncode == 1 and "no alias 'nope'" in missing.stderr and "candidate" in missing.stderr

    gc = json.loads(run("registry", "gc", "--json").stdout)
    assert gc["deleted"] is False


def test_wrong_credentials_and_unreachable_endpoint_are_clear(stack):
    run = stack["run"]
    secret = "WrongSecret-" + "x" * 20
    proc = run(
        "registry",
        "ls",
        check=False,
        extra_env={
            "AWS_ACCESS_KEY_ID": read_credentials_file(stack["state"] / "aws_credentials").access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
        },
    )
    assert proc.returncode == 1
    assert "rejected the credentials" in proc.stderr
    assert secret not in proc.stdout + proc.stderr
    closed = _free_port()
    proc = run(
        "registry",
        "ls",
        check=False,
        extra_env={
            "REFLADE_STORAGE_ENDPOINT": f"http://127.0.0.1:{closed}",
            "REFLADE_STORAGE_MAX_ATTEMPTS": "1",
        },
    )
    assert proc.returncode == 1
    assert (
        f"cannot reach object store at http://127.0.0.1:{closed}: connection refused; is `reflade up` running?"
        in (" ".join(proc.stderr.split()))
    )
    proc = run("registry", "ls", check=False, extra_env={"REFLADE_STORAGE_BUCKET": "no-such-bucket"})
    assert proc.returncode == 1 and "bucket 'no-such-bucket' does not exist" in " ".join(proc.stderr.split())


def test_job_runs_shipped_code_and_no_key_is_visible(stack):
    run = stack["run"]
    state = json.loads((stack["state"] / "stack.json").read_text())
    creds = read_credentials_file(stack["state"] / "aws_credentials")
    token = (stack["state"] / "ray_auth_token").read_text().strip()

    out = run("jobs", "submit", "doctor", "--follow").stdout
    assert "SUCCEEDED" in out
    doc = json.loads(
        next(line for line in out.splitlines() if line.startswith("REFLADE_DOCTOR ")).split(" ", 1)[1]
    )
    assert doc["storage"]["status"] == "ok" and doc["storage"]["bucket"] == "reflade"
    assert doc["stdlib_platform"] == "Linux"
    assert doc["ray"]["resources"]["CPU"] == 2.0
    # The code ran from the wheel Ray installed for the job, not from the source tree.
    assert "runtime_resources/py_modules_files/reflade-" in doc["reflade_module_file"]
    # Credentials came from the head's own environment (a 0600 file), not from the job.
    assert doc["storage"]["credentials_from"] == f"file {stack['state'] / 'aws_credentials'}"

    jobs = json.loads(run("jobs", "ls", "--json").stdout)
    assert jobs and all("reflade.platform.jobrunner" in j["entrypoint"] for j in jobs)
    job_id = jobs[0]["job_id"]
    assert json.loads(run("jobs", "status", job_id, "--json").stdout)["status"] == "SUCCEEDED"
    assert "REFLADE_DOCTOR" in run("jobs", "logs", job_id).stdout

    # Neither the job API nor the dashboard shows a key (the runtime_env carries locations only).
    headers = {"Authorization": f"Bearer {token}"}
    url = state["ray"]["dashboard_url"]
    seen = ""
    for path in (
        "/api/jobs/",
        f"/api/jobs/{job_id}",
        "/api/v0/tasks?limit=100",
        "/api/v0/actors?limit=100",
        "/nodes?view=summary",
        "/api/cluster_status",
    ):
        r = requests.get(url + path, headers=headers, timeout=10)
        seen += r.text
    info = json.loads(requests.get(f"{url}/api/jobs/{job_id}", headers=headers, timeout=10).text)
    assert "py_modules" in info["runtime_env"] and info["runtime_env"]["py_modules"][0].endswith(".whl")
    assert "REFLADE_STORAGE_ENDPOINT" in info["runtime_env"]["env_vars"]
    for secret in (creds.secret_access_key, creds.access_key_id, token):
        assert secret not in seen
        assert secret not in out


def test_engine_runs_as_a_job(stack, tmp_path):
    """`reflade jobs submit engine -- run ...`: the data engine as a Ray job on the token-auth head."""
    import skimage.data
    from PIL import Image

    run = stack["run"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(photos / f"{name}.png")
    run("registry", "import", "raw-images", "two-photos", str(photos))
    out = run(
        "jobs",
        "submit",
        "engine",
        "--follow",
        "--",
        "run",
        "--input",
        "raw-images/two-photos",
        "--dataset",
        "jobbed",
        "--synthetic",
        "2",
    ).stdout
    assert "SUCCEEDED" in out and "data engine stages" in out
    shown = json.loads(run("registry", "show", "dataset/jobbed", "--json").stdout)
    assert shown["metrics"]["images_in"] == 4
    assert any(p.startswith("raw-manifest/jobbed-input@") for p in shown["parents"])
    stats = json.loads(run("data", "stats", "dataset/jobbed", "--json").stdout)
    assert stats["rows"] == shown["metadata"]["rows"] > 0


def test_jobs_stop_and_follow(stack):
    run = stack["run"]
    job_id = run("jobs", "submit", "sleep", "--", "120").stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 120
    while json.loads(run("jobs", "status", job_id, "--json").stdout)["status"] != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(1)
    assert "stop requested" in run("jobs", "stop", job_id).stdout
    while (st := json.loads(run("jobs", "status", job_id, "--json").stdout)["status"]) not in (
        "STOPPED",
        "FAILED",
    ):
        assert time.monotonic() < deadline, "job never stopped"
        time.sleep(1)
    assert st == "STOPPED"

    short = run("jobs", "submit", "sleep", "--", "1").stdout.strip().splitlines()[-1]
    followed = run("jobs", "logs", short, "--follow", timeout=180).stdout
    assert "sleeping ['1']" in followed

    unknown = run("jobs", "submit", "no-such-kind", check=False)
    assert (
        unknown.returncode == 1
        and "unknown job kind 'no-such-kind'" in unknown.stderr
        and "doctor" in unknown.stderr
    )


def test_down_stops_everything(stack, tmp_path):
    run = stack["run"]
    keep = tmp_path / "kept.txt"
    keep.write_text("survives a restart")
    run("registry", "import", "dataset", "kept", str(keep))
    state = json.loads((stack["state"] / "stack.json").read_text())
    run("down")
    assert not (stack["state"] / "stack.json").exists()
    for port in (stack["s3_port"], int(state["ray"]["address"].rsplit(":", 1)[1])):
        deadline = time.monotonic() + 10
        while port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not port_in_use("127.0.0.1", port), f"port {port} still bound after down"
    st = run("status", "--json", check=False)
    assert json.loads(st.stdout)["running"] is False
    assert "nothing to stop" in run("down").stdout
    # Data survives: a new `up` serves the same registry.
    run("up")
    run("registry", "download", "dataset/kept", str(tmp_path / "back"))
    assert (tmp_path / "back" / "kept.txt").read_text() == "survives a restart"
    run("down")
