"""Every README command that needs the cluster, run as a user runs it: `reflade up`, then each command in a fresh
shell.

**This is the place where every new cluster command of the README is added** (a command that talks to Ray or to
the object store of `reflade up`): one `sh(...)` line with tiny settings, in the order a reader meets it.

Each command runs in its own process with the environment of a user's new terminal: PATH (the venv's `bin`
first, as after `activate`), HOME, and `REFLADE_CONFIG` naming this test's configuration file (the `stack`
section only, so that the stack takes free ports; the storage endpoint follows `stack.s3_port`). No `RAY_*`, no
`AWS_*`: the commands must find the head's token and address, and the bucket's credentials, by themselves. Each
must exit 0 with no traceback. The runs are tiny (two photos, four synthetic scenes, two training steps).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REFLADE = str(Path(sys.executable).parent / "reflade")
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


class Shell:
    """Runs `reflade ARGS` as a new process in a user's fresh environment; records what ran and how long."""

    def __init__(self, root: Path, user):
        self.root = root
        self.home, self.config, self.ports, self.env = user.home, user.config, user.ports, user.env
        self.times: list[tuple[str, float]] = []

    def __call__(self, *args: str, timeout: float = 300) -> str:
        t0 = time.monotonic()
        proc = subprocess.run(
            [REFLADE, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        self.times.append((" ".join(args), time.monotonic() - t0))
        out = proc.stdout + proc.stderr
        cmd = "reflade " + " ".join(args)
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{out[-6000:]}"
        assert "Traceback" not in out, f"{cmd} printed a traceback:\n{out[-6000:]}"
        return proc.stdout


@pytest.fixture(scope="module")
def sh(tmp_path_factory, private_stack):
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("fresh-shell")
    shell = Shell(root, private_stack(root))
    photos = shell.root / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(photos / f"{name}.png")
    shell("up", timeout=300)
    try:
        yield shell
    finally:
        shell("down", timeout=300)
        for cmd, secs in shell.times:
            print(f"{secs:7.1f} s  reflade {cmd}")


def _job_id(out: str) -> str:
    match = re.search(r"submitted \S+ as (\S+) to", out)
    assert match, out
    return match.group(1)


def test_stack_is_up(sh):
    st = json.loads(sh("status", "--json"))
    assert st["healthy"] and st["ray"]["auth"] == "token"
    assert st["object_store"]["endpoint"] == f"http://127.0.0.1:{sh.ports['s3_port']}"


def test_data_engine_on_a_local_folder(sh):
    out = sh(
        "engine",
        "run",
        "--input",
        "./photos",
        "--dataset",
        "e2e",
        "--synthetic",
        "4",
        "--synthetic-size",
        "128",
    )
    assert "dataset/e2e@1 (new)" in out


def test_data_engine_neural_backends(sh):
    assert "weights/tiny-blip@" in sh("engine", "tiny-weights")
    out = sh("engine", "run", "--input", "./photos", "--dataset", "e2e-neural", "--backends", "neural")
    assert "dataset/e2e-neural@1 (new)" in out


def test_data_commands(sh):
    stats = json.loads(sh("data", "stats", "dataset/e2e", "--json"))
    assert stats["rows"] > 0
    sh("data", "stats", "dataset/e2e")
    sh("data", "export", "dataset/e2e@1:test", "./browse")
    sh("data", "import", "./browse", "--dataset", "e2e-quality", "--parent", "dataset/e2e@1")


def test_registry_commands(sh):
    sh("registry", "import", "raw-images", "e2e-photos", "./photos", "--license", "BSD-3-Clause")
    assert "raw-images/e2e-photos" in sh("registry", "ls")
    sh("registry", "ls", "dataset", "--json")
    sh("registry", "show", "dataset/e2e")
    sh("registry", "download", "raw-images/e2e-photos@1", "./downloaded")
    assert sorted(p.name for p in (sh.root / "downloaded").iterdir()) == ["chelsea.png", "coffee.png"]
    sh("registry", "alias", "dataset/e2e@1", "production")
    sh("registry", "history", "dataset/e2e", "production")
    sh("registry", "lineage", "dataset/e2e")
    sh("registry", "gc")


def test_training(sh):
    out = sh("train", "vae", "--dataset", "dataset/e2e", "--steps", "2", "--batch-size", "2")
    assert "weights/tiny-vae@1" in out
    out = sh(
        "train", "--dataset", "dataset/e2e", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "2"
    )
    assert "model/reflayer@1 (alias candidate)" in out


def test_evaluation(sh):
    assert "weights/tiny-alexnet@1" in sh("eval", "stand-in-weights")
    tiny = ["--stand-in", "--max-samples", "2", "--metric-size", "32", "--steps", "2"]
    model = ["--model", "model/reflayer@candidate"]
    out = sh("eval", "run", *model, "--dataset", "dataset/e2e:test", *tiny)
    assert "report eval-report/reflayer@1" in out and "stand-in feature networks" in out
    sh(
        "eval",
        "run",
        *model,
        "--dataset",
        "dataset/e2e:test",
        *tiny,
        "--prompt-types",
        "all",
        "-o",
        "./report",
    )
    assert (sh.root / "report" / "report.html").is_file()
    out = sh("eval", "run", *model, "--dataset", "dataset/e2e:test", *tiny, "--promote", "--allow-first")
    assert "production -> model/reflayer@1" in out
    out = sh(
        "eval",
        "run",
        *model,
        "--dataset",
        "dataset/e2e:test",
        *tiny,
        "--baseline",
        "model/reflayer@production",
    )
    assert "PASSED" in out and "report eval-report/reflayer@4" in out
    out = sh(
        "jobs", "submit", "eval", "--follow", "--", "run", *model, "--dataset", "dataset/e2e:test", *tiny
    )
    assert "SUCCEEDED" in out and "eval-report/reflayer@5" in out
    out = sh("eval", "photos", *model, "--steps", "2", "--out", "photos.png")
    assert "reflayer:model/reflayer@1," in out and (sh.root / "photos.png").is_file()
    hist = json.loads(sh("eval", "history", "model/reflayer", "--json"))
    assert [h["report"] for h in hist] == [f"eval-report/reflayer@{i}" for i in range(1, 6)]
    sh("eval", "history", "model/reflayer")
    assert "PASSED" in sh("eval", "compare", "eval-report/reflayer@4", "eval-report/reflayer@1")
    # three subjects on one setup of six rows (both kinds have at least two, so every FID is defined)
    six = [*tiny[:2], "6", *tiny[3:]]
    sh("eval", "run", *model, "--dataset", "dataset/e2e:test", *six)
    for baseline in ("classical", "copy-visible"):
        out = sh("eval", "run", "--model", baseline, "--dataset", "dataset/e2e:test", *six)
        assert f"report eval-report/{baseline}@1" in out
    votes = [
        {"item": f"i{i}", "prompt": "text+box:fine", "model_a": a, "model_b": b, "winner": w}
        for i, (a, b, w) in enumerate(
            [
                ("model/reflayer@1", "classical", "b"),
                ("classical", "copy-visible", "a"),
                ("model/reflayer@1", "copy-visible", "tie"),
            ]
            * 4
        )
    ]
    (sh.root / "votes.jsonl").write_text("".join(json.dumps(v) + "\n" for v in votes))
    out = sh(
        "eval",
        "elo",
        "votes.jsonl",
        "--reports",
        "eval-report/reflayer@6,eval-report/classical@1,eval-report/copy-visible@1",
        "--fit-bounds",
    )
    assert "Pearson" in out and "classical" in out and "after" in out


def test_serving(sh):
    import skimage.data
    from PIL import Image

    out = sh("serve", "token", "create")
    assert out.strip().splitlines()[-1].startswith("rl_")
    assert f"http://127.0.0.1:{sh.ports['serve_port']}" in sh(
        "serve", "up", "--model", "model/reflayer@candidate"
    )
    assert "ingress" in sh("serve", "status") and "decomposer" in sh("serve", "status")
    Image.fromarray(skimage.data.coffee()[::4, ::4]).save(sh.root / "photo.png")
    out = sh("decompose", "photo.png", "--box", "40,30,100,90", "--text", "the red cup", "-o", "layer.png")
    assert "model/reflayer@" in out and (sh.root / "layer.png").is_file()
    sh(
        "decompose",
        "photo.png",
        "--box",
        "40,30,100,90",
        "-o",
        "bg.png",
        "--kind",
        "background",
        "--model",
        "classical",
    )
    layer = np.asarray(Image.open(sh.root / "bg.png"))
    assert layer.shape == (100, 150, 4) and (layer[..., 3] == 255).all()
    assert "service removed" in sh("serve", "down")


def test_jobs(sh):
    kinds = json.loads(sh("jobs", "kinds", "--json"))
    assert {"doctor", "registry", "engine", "train", "train-vae", "eval"} <= set(kinds)
    out = sh("jobs", "submit", "doctor", "--follow")
    assert "SUCCEEDED" in out
    job = _job_id(out)
    sh("jobs", "submit", "registry", "--follow", "--", "gc")
    out = sh(
        "jobs",
        "submit",
        "engine",
        "--follow",
        "--",
        "run",
        "--input",
        "raw-images/e2e-photos",
        "--dataset",
        "e2e-job",
    )
    assert "SUCCEEDED" in out
    out = sh("jobs", "submit", "train-vae", "--follow", "--", "--dataset", "dataset/e2e", "--steps", "2")
    assert "SUCCEEDED" in out
    out = sh(
        "jobs",
        "submit",
        "train",
        "--follow",
        "--",
        "--dataset",
        "dataset/e2e",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "2",
    )
    assert "SUCCEEDED" in out
    assert job in sh("jobs", "ls")
    assert json.loads(sh("jobs", "status", job, "--json"))["status"] == "SUCCEEDED"
    assert "REFLADE_DOCTOR" in sh("jobs", "logs", job)
