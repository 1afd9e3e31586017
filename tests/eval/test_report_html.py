"""The evaluation report's HTML as a browser sees it: a real report (3 synthetic scenes, both baselines, the stand-in
feature networks, no Ray, no registry) served over HTTP and rendered by headless Chromium, which says whether every
image it links loaded. Without Chromium the browser test is skipped (``make chromium`` installs it)."""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import rows_to_table, table_to_rows
from reflade.engine.synth import make_scene
from reflade.eval.config import STAND_IN_NETWORKS
from reflade.eval.fid import FID_BACKGROUND
from reflade.eval.hpa import HPANormalization
from reflade.eval.report import STAND_IN_TITLE, write_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_TYPES = ["text+box:fine", "box:coarse"]
SUBJECT = "classical"
MODELS = [SUBJECT, "copy-visible"]  # the subject first, as the eval job orders them
METRIC_SIZE = 48
BROKEN = "missing.png"
CHECK_SCRIPT = f"""
<img id="broken-probe" src="{BROKEN}" alt="a link that must not load">
<script>
window.addEventListener("load", function () {{
  var images = Array.from(document.images).map(function (im) {{
    return [im.getAttribute("src"), im.complete, im.naturalWidth, im.naturalHeight, im.src];
  }});
  var resources = performance.getEntriesByType("resource").map(function (r) {{ return r.name; }});
  var pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify({{images: images, resources: resources, title: document.title}});
  document.body.appendChild(pre);
}});
</script>
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A report written by ``write_report`` from really scored items: (folder, report.json's content)."""
    import pandas as pd

    from reflade.eval.network_convert import build_stand_ins
    from reflade.eval.networks import FeatureNetworks, load_network_folder
    from reflade.eval.scoring import PredictStage, ScoreStage, expand_row, score_local
    from reflade.eval.summary import Accumulator

    tmp = tmp_path_factory.mktemp("report-html")
    rows = []
    for seed in (41, 42, 43):
        rows += synthetic_rows(
            make_scene(seed, size=(64, 64), n_objects=(2, 2)), f"s{seed}", "cfg", "test", EngineConfig()
        )
    rows = table_to_rows(rows_to_table(rows))  # as the job reads them from Parquet
    items = [item for row in rows for item in expand_row(row, PROMPT_TYPES)]
    assert {i["prompt_type"] for i in items} == set(PROMPT_TYPES)

    folders = build_stand_ins(tmp / "nets")
    nets = {kind: load_network_folder(kind, folder) for kind, folder in folders.items()}
    networks = FeatureNetworks(
        lpips=nets["lpips"],
        clip=nets["clip"],
        inception=nets["inception"],
        refs={k: f"{v}@1" for k, v in STAND_IN_NETWORKS.items()},
        stand_in=True,
    )
    predict = PredictStage(MODELS, METRIC_SIZE, steps=2, guidance=1.0, seed=0)
    score = ScoreStage(MODELS, METRIC_SIZE, networks)
    scored: pd.DataFrame = score_local(items, predict, score, batch_size=8)
    assert len(scored) == len(items) * len(MODELS)

    acc = Accumulator(HPANormalization())
    acc.add(scored.drop(columns=["pred_png"]).to_dict("records"))
    by_sample = {r["sample_id"]: r for r in rows}

    def pictures(item_ids: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for item_id in item_ids:
            mine = scored[scored["item_id"] == item_id]
            out[item_id] = {
                "row": by_sample[item_id.split("/", 1)[0]],
                "preds": dict(zip(mine["model"], mine["pred_png"], strict=True)),
            }
        return out

    setup = {
        "dataset": "dataset/evalset@1:test",
        "prompt_types": PROMPT_TYPES,
        "networks": networks.refs,
        "stand_in": True,
        "metric_size": METRIC_SIZE,
        "fid_background": list(FID_BACKGROUND),
        "steps": 2,
        "guidance": 1.0,
        "seed": 0,
        "normalization": HPANormalization().to_dict(),
    }
    folder = tmp / "report"
    content = write_report(
        folder,
        subject=SUBJECT,
        models=MODELS,
        setup=setup,
        tables=acc.tables(),
        samples=acc.samples,
        pictures=pictures,
        report_samples=2,
    )
    return folder, content


@pytest.fixture
def served(report):
    """The report folder over HTTP on 127.0.0.1 (a free port): its base URL."""
    folder, _ = report
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


def _render(chromium: str, url: str, profile: Path) -> dict[str, Any]:
    """Load ``url`` in headless Chromium and return the JSON the check script wrote into the DOM."""
    cmd = [
        chromium,
        "--headless=new",
        "--disable-gpu",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--dump-dom",
        "--virtual-time-budget=10000",
    ]
    if os.geteuid() == 0:
        cmd.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r'<pre id="img-check">(.*?)</pre>', proc.stdout, re.S)
    assert match, (
        f"chromium (rc {proc.returncode}) dumped no check result; stderr tail:\n{proc.stderr[-2000:]}"
    )
    return json.loads(html.unescape(match.group(1)))


def test_report_html_is_self_contained(report):
    folder, content = report
    page = (folder / "report.html").read_text()
    title = re.search(r"<title>(.*?)</title>", page, re.S)
    assert title and STAND_IN_TITLE in html.unescape(title.group(1))
    assert STAND_IN_TITLE in content["title"]
    assert "Beside the baselines" in page and "<h2>Tables</h2>" in page
    for kind in ("foreground", "background"):
        assert f"<h3>{kind}</h3>" in page
    for model in MODELS:
        assert f"<td>{model}</td>" in page
    # No CDN, no remote font, no script: every link is relative to the folder.
    assert not re.search(r"""(?:src|href)\s*=\s*['"]?\s*(?:[a-z][a-z0-9+.-]*:|//)""", page, re.I)
    assert not re.search(r"https?://|@import|url\(", page, re.I)
    assert "<script" not in page.lower()
    # Every linked file is in the folder.
    links = re.findall(r"""<img[^>]*\ssrc=['"]([^'"]+)['"]""", page)
    assert links and all((folder / link).is_file() for link in links)


def test_report_images_load_in_chromium(report, served, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(
            "chromium is not installed: run `make chromium` (Debian's chromium) to render report.html"
        )
    folder, content = report
    page = (folder / "report.html").read_text()
    assert page.rstrip().endswith("</body></html>")
    (folder / "check.html").write_text(page.replace("</body></html>", CHECK_SCRIPT + "</body></html>"))

    result = _render(chromium, f"{served}/check.html", tmp_path / "profile")

    assert STAND_IN_TITLE in result["title"]
    images = [i for i in result["images"] if i[0] != BROKEN]
    probe = [i for i in result["images"] if i[0] == BROKEN]
    listed = [f["path"] for f in content["figures"]] + [
        path for g in content["grid"] for path in g["cells"].values()
    ]
    assert content["figures"] and content["grid"]
    assert len(images) >= len(listed) and set(listed) <= {i[0] for i in images}
    not_loaded = [i for i in images if not (i[1] and i[2] > 0 and i[3] > 0)]
    assert not not_loaded, f"images that did not load: {not_loaded}"
    # The check can fail: the deliberately broken link is reported as not loaded.
    assert len(probe) == 1 and probe[0][2] == 0, probe
    # Everything the page fetched came from the served folder.
    assert result["resources"] and all(r.startswith(served + "/") for r in result["resources"])


def test_the_demo_writes_one_picture_per_grid_sample(report, tmp_path):
    """The main job's pictures (eval.demo.sample_strips): one per grid entry, every cell side by side, labelled."""
    from reflade.engine.schema import decode_image
    from reflade.eval.demo import sample_strips

    folder, content = report
    written = sample_strips(folder, tmp_path / "decompositions")
    assert len(written) == len(content["grid"]) > 0
    for path, entry in zip(written, content["grid"], strict=True):
        strip = decode_image(path.read_bytes(), "RGB")
        cells = [decode_image((folder / rel).read_bytes(), "RGB") for rel in entry["cells"].values()]
        scale = max(1, 128 // max(c.shape[0] for c in cells))
        assert strip.shape[1] == sum(
            c.shape[1] * scale + 4 for c in cells
        )  # every cell, enlarged, with its gap
        first = cells[0]
        top = strip[14 : 14 + first.shape[0] * scale : scale, : first.shape[1] * scale : scale]
        assert np.array_equal(top, first)  # the image + prompt cell itself, not a placeholder
        assert entry["kind"] in path.name and entry["which"] in path.name
