"""The service's web pages and the vote API, on the session's service (tests/serve/conftest.py), over real HTTP and
in a real headless Chromium (Debian's ``chromium``, driven by Playwright with ``executable_path``; the browser tests
are skipped without it: ``make chromium`` installs it).

A screenshot of each page is kept as a test artefact: in ``$REFLADE_TEST_ARTEFACTS`` when set, else in
``artefacts/`` under pytest's base temporary folder (``--basetemp``; pytest keeps the last three runs).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests

from reflade.engine.config import EngineConfig
from reflade.engine.pipeline import synthetic_rows
from reflade.engine.schema import decode_image, encode_png, write_shard
from reflade.engine.synth import make_scene
from reflade.eval.elo import WINNERS, Vote, fit_elo, read_votes
from reflade.serve.votes import VOTE_FIELDS

pytestmark = pytest.mark.usefixtures("ray_cluster", "one_torch_thread")

SIZE = (64, 80)  # height, width of every scene here
TIMEOUT_MS = 180_000  # a first call of the tiny model loads it on a replica


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(service, tmp_path_factory) -> dict:
    """``dataset/voteset@1`` in the service's registry: test rows in two shards, train rows that must never show."""
    tmp = tmp_path_factory.mktemp("voteset")
    (tmp / "ds" / "shards").mkdir(parents=True)
    test_rows, train_rows = [], []
    for seed in (1, 2):
        test_rows += synthetic_rows(
            make_scene(seed, size=SIZE, n_objects=(2, 2)), f"s{seed}", "c", "test", EngineConfig()
        )
    train_rows += synthetic_rows(
        make_scene(3, size=SIZE, n_objects=(2, 2)), "s3", "c", "train", EngineConfig()
    )
    write_shard(test_rows[:2] + train_rows, str(tmp / "ds" / "shards" / "part-0.parquet"))
    write_shard(test_rows[2:], str(tmp / "ds" / "shards" / "part-1.parquet"))
    version = service["registry"].create("dataset", "voteset", tmp / "ds", progress=False)
    return {
        "ref": version.ref,
        "test_ids": {r["sample_id"] for r in test_rows},
        "train_ids": {r["sample_id"] for r in train_rows},
    }


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    root = os.environ.get("REFLADE_TEST_ARTEFACTS")
    folder = Path(root) if root else tmp_path_factory.getbasetemp() / "artefacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium under Playwright (never a downloaded browser)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip(
            "chromium is not installed: run `make chromium` (Debian's chromium) to test the pages in a browser"
        )
    pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright package is missing: pip install -e '.[dev]' (make test does)",
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Chromium refuses to run as root with its sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = p.chromium.launch(executable_path=chromium, args=args)
        yield b
        b.close()


def _auth(service) -> dict[str, str]:
    return {"Authorization": f"Bearer {service['token']}"}


def _pair(service, token=True, **params) -> requests.Response:
    headers = _auth(service) if token else {}
    return requests.get(service["url"] + "/v1/vote/pair", params=params, headers=headers, timeout=180)


def _vote(service, body, token=True, headers=None) -> requests.Response:
    headers = headers if headers is not None else _auth(service) if token else {}
    return requests.post(service["url"] + "/v1/votes", json=body, headers=headers, timeout=60)


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------- the pages
def test_pages_and_their_files_are_served_without_a_token_and_link_nothing_outside(service):
    for route, title in (("/", "decompose"), ("/vote", "better")):
        r = requests.get(service["url"] + route, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert title in re.search(r"<title>(.*?)</title>", r.text).group(1)
        links = re.findall(r"""(?:src|href)="([^"]+)\"""", r.text)
        files = [link for link in links if link.startswith("static/")]
        assert len(files) == 3, links  # the CSS, common.js and the page's script
        for link in files:
            f = requests.get(f"{service['url']}/{link}", timeout=30)
            assert f.status_code == 200 and f.content, link
            assert f.headers["content-type"].split(";")[0] in ("text/css", "text/javascript"), link
        # Relative links only (a data: URL fetches nothing: it keeps the browser from asking for /favicon.ico).
        assert all(not re.match(r"(?!data:)[a-z][a-z0-9+.-]*:|//", link, re.I) for link in links), links
    from reflade.serve.pages import static_files

    for name, content in static_files().items():
        text = content.decode()
        assert not re.search(r"(?:https?|wss?|ftp):|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
        if name.endswith(".css"):
            assert not re.search(r"@import|url\(", text, re.I), name
    for bad in ("pages.py", "__init__.py", "nope.js", ".html"):
        r = requests.get(f"{service['url']}/static/{bad}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (bad, r.text)
    r = requests.get(f"{service['url']}/static/..%2Fapp.py", timeout=30)  # no route takes a path
    assert r.status_code == 404 and "RefLade" not in r.text


def test_openapi_documents_the_vote_routes_and_not_the_pages(service):
    doc = requests.get(service["url"] + "/openapi.json", timeout=30).json()
    pair = doc["paths"]["/v1/vote/pair"]["get"]
    assert {p["name"] for p in pair["parameters"] if p["required"]} == {"dataset", "a", "b"}
    assert {"200", "401", "404", "422"} <= set(pair["responses"])
    vote = doc["paths"]["/v1/votes"]["post"]
    schema = vote["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == list(VOTE_FIELDS)
    assert schema["properties"]["winner"]["enum"] == list(WINNERS)
    assert {"201", "401", "413", "422"} <= set(vote["responses"])
    assert not {"/", "/vote", "/static/{name}"} & set(doc["paths"])


# ---------------------------------------------------------------------------------------------- the vote API
def test_a_prompt_as_the_vote_page_shows_it():
    from reflade.serve.votes import describe_prompt, prompt_for_page

    mask = encode_png(np.where(np.arange(12).reshape(3, 4) > 5, 255, 0).astype(np.uint8))
    prompt = {
        "type": "text+point",
        "points": [(3, 4, 1), (5, 6, 0)],
        "box": None,
        "mask": mask,
        "text": "a disc",
    }
    page = prompt_for_page(prompt)
    assert page["points"] == [[3, 4, 1], [5, 6, 0]] and page["box"] is None and page["granularity"] == "fine"
    assert base64.b64decode(page["mask_png"]) == mask and json.dumps(page)
    fg = describe_prompt(prompt, "foreground")
    assert (
        fg
        == 'the object given by "a disc" + 1 positive, 1 negative point(s) + the blue mask, complete (its foreground layer)'
    )
    bg = describe_prompt({"box": [1, 2, 30, 40]}, "background")
    assert bg == "the scene without the object given by box (1, 2)-(30, 40) (the background layer)"


def test_a_pair_is_a_test_item_decomposed_by_both_models(service, dataset):
    m1 = service["refs"][0]
    r = _pair(service, dataset=dataset["ref"], a="classical", b=m1, prompt_type="box", seed=7)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["dataset"] == dataset["ref"] and doc["split"] == "test"
    assert doc["sample_id"] in dataset["test_ids"]
    assert doc["prompt_type"].startswith("box:") and doc["item"] == f"{doc['sample_id']}/{doc['prompt_type']}"
    assert doc["prompt"]["box"] and doc["description"].count("box (") == 1
    image = decode_image(base64.b64decode(doc["image_png"]), "RGB")
    assert image.shape == (*SIZE, 3) and (doc["height"], doc["width"]) == SIZE
    layers = {side: decode_image(base64.b64decode(doc[side]["layer_png"]), "RGBA") for side in "ab"}
    assert all(layer.shape == (*SIZE, 4) for layer in layers.values())
    assert {doc["a"]["model"], doc["b"]["model"]} == {"classical", m1}
    # Same seed, same pair; other seeds put either model on the left, and never a train row.
    again = _pair(service, dataset=dataset["ref"], a="classical", b=m1, prompt_type="box", seed=7).json()
    assert (again["item"], again["a"]["model"], again["seed"]) == (
        doc["item"],
        doc["a"]["model"],
        doc["seed"],
    )
    lefts, samples = set(), set()
    for seed in range(6):
        other = _pair(service, dataset=dataset["ref"], a=m1, b="classical", seed=seed)
        assert other.status_code == 200, other.text
        lefts.add(other.json()["a"]["model"])
        samples.add(other.json()["sample_id"])
    assert lefts == {"classical", m1}
    assert samples <= dataset["test_ids"] and not samples & dataset["train_ids"]


DROP = object()  # a key left out of the request


@pytest.mark.parametrize(
    "change, status, code",
    [
        ({"b": DROP}, 422, "missing_field"),
        ({"a": "classical"}, 422, "same_model"),
        ({"dataset": "dataset/nope"}, 404, "unknown_dataset"),
        ({"dataset": "model/reflayer"}, 422, "invalid_dataset"),
        ({"dataset": "dataset/../x"}, 422, "invalid_dataset"),
        ({"dataset": "{ds}:quality"}, 404, "no_items"),
        ({"prompt_type": "scribble"}, 404, "no_items"),
        ({"prompt_type": "text:fine"}, 422, "refused"),  # classical takes no text alone: every try is refused
        ({"b": "model/nope@1"}, 404, "unknown_model"),
        ({"seed": "x"}, 422, "invalid_field"),
        ({"colour": "red"}, 422, "unknown_field"),
    ],
)
def test_pair_errors_are_4xx_json(service, dataset, change, status, code):
    query = {"dataset": dataset["ref"], "a": service["refs"][0], "b": "classical"}
    query.update(change)
    query = {k: v.format(ds=dataset["ref"]) for k, v in query.items() if v is not DROP}
    r = _pair(service, **query)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert requests.get(service["url"] + "/healthz", timeout=30).status_code == 200


def test_pair_and_vote_need_a_token(service, dataset):
    r = _pair(service, token=False, dataset=dataset["ref"], a="classical", b=service["refs"][0])
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
    body = {"name": _name(), "item": "i", "prompt": "box", "model_a": "x", "model_b": "y", "winner": "a"}
    assert _vote(service, body, token=False).status_code == 401
    r = _vote(service, body, headers={"Authorization": "Bearer rl_wrong"})
    assert r.status_code == 403
    assert service["registry"].latest_version("votes", body["name"]) is None


def test_votes_become_versions_of_votes_name_that_the_eval_package_rates(service):
    registry, name = service["registry"], _name()
    cast = [
        {
            "item": "s1/box:fine",
            "prompt": "box:fine",
            "model_a": "classical",
            "model_b": "m@1",
            "winner": "a",
        },
        {
            "item": "s2/box:fine",
            "prompt": "box:fine",
            "model_a": "m@1",
            "model_b": "classical",
            "winner": "tie",
        },
        {
            "item": "s3/point:fine",
            "prompt": "point:fine",
            "model_a": "m@1",
            "model_b": "classical",
            "winner": "b",
        },
    ]
    for n, vote in enumerate(cast, start=1):
        r = _vote(service, {"name": name, **vote})
        assert r.status_code == 201, r.text
        assert r.json() == {"ref": f"votes/{name}@{n}", "version": n, "n_votes": n}
        assert read_votes(f"votes/{name}@{n}", registry) == [Vote(**v) for v in cast[:n]]
    assert registry.resolve(f"votes/{name}").metadata["n_votes"] == 3
    ratings = fit_elo(read_votes(f"votes/{name}", registry))
    assert ratings["classical"] > ratings["m@1"]  # two wins and a tie


def test_votes_sent_at_once_are_all_kept(service):
    registry, name = service["registry"], _name()
    statuses: list[int] = []

    def send(i: int) -> None:
        body = {"name": name, "item": f"s{i}/box:fine", "prompt": "box:fine", "model_a": "p", "model_b": "q"}
        statuses.append(_vote(service, {**body, "winner": WINNERS[i % 3]}).status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert statuses == [201] * 6
    votes = read_votes(f"votes/{name}", registry)
    assert sorted(v.item for v in votes) == [f"s{i}/box:fine" for i in range(6)]
    assert registry.versions("votes", name) == list(range(1, 7))


@pytest.mark.parametrize(
    "change, status, code",
    [
        ({"winner": "c"}, 422, "invalid_vote"),
        ({"winner": "p"}, 422, "invalid_vote"),  # a model's name is for vote files, not for this API
        ({"winner": DROP}, 422, "missing_field"),
        ({"name": "../escape"}, 422, "invalid_name"),
        ({"name": "Upper Case"}, 422, "invalid_name"),
        ({"model_b": "p"}, 422, "invalid_vote"),
        ({"item": ""}, 422, "invalid_vote"),
        ({"item": 3}, 422, "invalid_vote"),
        ({"item": "x" * 301}, 422, "invalid_field"),
        ({"extra": 1}, 422, "unknown_field"),
    ],
)
def test_bad_votes_are_4xx_and_record_nothing(service, change, status, code):
    body = {"name": _name(), "item": "s/box:fine", "prompt": "box:fine", "model_a": "p", "model_b": "q"}
    body = {k: v for k, v in {**body, "winner": "a", **change}.items() if v is not DROP}
    r = _vote(service, body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    for name in {body.get("name"), "escape", "upper case"} - {None}:
        if "/" not in name and " " not in name:
            assert service["registry"].latest_version("votes", name) is None


def test_vote_bodies_that_are_not_json_objects(service):
    url, headers = service["url"] + "/v1/votes", _auth(service)
    cases = [
        (b"{nope", "application/json", 400),
        (b"[1, 2]", "application/json", 422),
        (b"name=x", "application/x-www-form-urlencoded", 415),
        (b"{" + b" " * 20_000 + b"}", "application/json", 413),
    ]
    for data, ctype, status in cases:
        r = requests.post(url, data=data, headers={**headers, "Content-Type": ctype}, timeout=30)
        assert r.status_code == status and r.json()["error"]["message"], (data[:20], r.text)


# ---------------------------------------------------------------------------------------------- in Chromium
class _Watch:
    """A page's console errors, uncaught exceptions and requests (the pages may call only the service)."""

    def __init__(self, page, origin: str):
        self.origin = origin
        self.errors: list[str] = []
        self.requests: list = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", lambda r: self.requests.append(r))

    def posts(self, path: str) -> list[dict]:
        return [json.loads(r.post_data) for r in self.requests if r.method == "POST" and path in r.url]

    def check(self) -> None:
        assert not self.errors, self.errors
        outside = [
            r.url for r in self.requests if not r.url.startswith((self.origin + "/", "data:", "blob:"))
        ]
        assert not outside, outside


def _screen(page, selector: str, x: float, y: float) -> tuple[float, float]:
    """Image pixel (x, y) of a canvas -> page coordinates (the canvas is shown scaled)."""
    box = page.locator(selector).bounding_box()
    return box["x"] + x * box["width"] / SIZE[1], box["y"] + y * box["height"] / SIZE[0]


def _screenshot(page, artefacts: Path, name: str) -> None:
    path = artefacts / name
    page.screenshot(path=str(path), full_page=True)
    shot = decode_image(path.read_bytes(), "RGB")
    assert shot.shape[0] > 200 and shot.shape[1] > 400 and shot.std() > 5  # a page, not a blank


def test_decompose_page_in_chromium(service, browser, artefacts):
    scene = make_scene(5, size=SIZE, n_objects=(2, 2))
    first, second = scene.objects[0], scene.objects[1]
    ys, xs = np.nonzero(first.visible_mask)
    point = (int(xs[len(xs) // 2]), int(ys[len(ys) // 2]))
    page = browser.new_page(accept_downloads=True, viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    watch = _Watch(page, service["url"])
    try:
        page.goto(service["url"] + "/")
        page.fill("#token", service["token"])
        page.fill("#model", "classical")
        page.set_input_files(
            "#image-file",
            files=[{"name": "scene.png", "mimeType": "image/png", "buffer": encode_png(scene.image)}],
        )
        page.wait_for_selector("#run:not([disabled])")

        # Layer 1: a positive point and a dragged box.
        page.mouse.click(*_screen(page, "#stage", point[0] + 0.5, point[1] + 0.5))
        page.check("#tool-box")
        x0, y0, x1, y1 = first.box
        page.mouse.move(*_screen(page, "#stage", x0, y0))
        page.mouse.down()
        page.mouse.move(*_screen(page, "#stage", (x0 + x1) / 2, (y0 + y1) / 2))
        page.mouse.move(*_screen(page, "#stage", x1, y1))
        page.mouse.up()
        page.click("#run")
        page.wait_for_selector("#layers li:nth-child(1)")
        assert page.eval_on_selector("#result", "im => [im.complete, im.naturalWidth, im.naturalHeight]") == [
            True,
            SIZE[1],
            SIZE[0],
        ]
        (sent,) = watch.posts("/v1/decompose")
        assert sent["prompt"]["points"] == [[point[0], point[1], 1]]
        assert np.abs(np.array(sent["prompt"]["box"]) - np.array(first.box)).max() <= 1, sent["prompt"]["box"]
        assert sent["model"] == "classical" and sent["response"] == "json" and sent["kind"] == "foreground"

        # Layer 2: a painted mask over the second object, a box and text.
        page.click("#clear")
        page.check("#tool-paint")
        bx0, by0, bx1, by1 = second.box
        cy = (by0 + by1) / 2
        page.mouse.move(*_screen(page, "#stage", bx0 + 1, cy))
        page.mouse.down()
        page.mouse.move(*_screen(page, "#stage", (bx0 + bx1) / 2, cy))
        page.mouse.move(*_screen(page, "#stage", bx1 - 1, cy))
        page.mouse.up()
        page.check("#tool-box")
        page.mouse.move(*_screen(page, "#stage", bx0, by0))
        page.mouse.down()
        page.mouse.move(*_screen(page, "#stage", bx1, by1))
        page.mouse.up()
        page.fill("#text", "the second shape")
        page.click("#run")
        page.wait_for_selector("#layers li:nth-child(2)")
        sent = watch.posts("/v1/decompose")[1]["prompt"]
        assert sent["text"] == "the second shape" and "points" not in sent
        mask = decode_image(base64.b64decode(sent["mask"].split(",", 1)[1]), "RGBA")[..., 3] >= 128
        assert mask.shape == SIZE and mask[int(cy), bx0 + 2 : bx1 - 2].all() and not mask[: by0 - 8].any()

        with page.expect_download() as shown:
            page.click("#download-png")
        png = decode_image(Path(shown.value.path()).read_bytes(), "RGBA")
        assert png.shape == (*SIZE, 4) and png[..., 3].any()
        assert shown.value.suggested_filename == "scene-layer-01-foreground.png"
        for fmt in ("zip", "ora"):
            with page.expect_download() as stack:
                page.click(f"#download-{fmt}")
            z = zipfile.ZipFile(io.BytesIO(Path(stack.value.path()).read_bytes()))
            pattern = r"layer-\d\d-foreground\.png" if fmt == "zip" else r"data/layer-\d{3}\.png"
            names = sorted(n for n in z.namelist() if re.fullmatch(pattern, n))
            assert len(names) == 2, z.namelist()
            # Made again in one call with the page's one seed: classical gives the very layers shown.
            assert np.array_equal(decode_image(z.read(names[1]), "RGBA"), png)
            if fmt == "ora":
                assert z.read("mimetype") == b"image/openraster"
        assert "error" not in (page.get_attribute("#status", "class") or ""), page.inner_text("#status")
        _screenshot(page, artefacts, "page-decompose.png")
        watch.check()
    finally:
        page.close()


def test_vote_page_in_chromium(service, dataset, browser, artefacts):
    from playwright.sync_api import expect

    registry, name, m1 = service["registry"], _name(), service["refs"][0]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    watch = _Watch(page, service["url"])
    try:
        page.goto(service["url"] + "/vote")
        page.fill("#token", service["token"])
        page.fill("#dataset", dataset["ref"])
        page.fill("#model-a", "classical")
        page.fill("#model-b", m1)
        page.fill("#prompt-type", "box")
        page.fill("#votes-name", name)
        page.uncheck("#auto-next")
        page.click("#next")
        page.wait_for_selector("#pick-a:not([disabled])")
        for side in ("#left", "#right"):
            assert page.eval_on_selector(side, "im => [im.complete, im.naturalWidth]") == [True, SIZE[1]]
        assert page.inner_text("#left-model") == ""  # the models stay unnamed until the vote
        assert "box (" in page.inner_text("#description")
        _screenshot(page, artefacts, "page-vote.png")

        page.click("#pick-a")
        expect(page.locator("#recorded")).to_contain_text(f"votes/{name}@1", timeout=TIMEOUT_MS)
        (vote,) = read_votes(f"votes/{name}", registry)
        (pair,) = [json.loads(r.post_data) for r in watch.requests if r.method == "POST"]
        left = page.inner_text("#left-model").strip("()")
        assert (
            vote.winner == "a" and vote.model_a == left and {vote.model_a, vote.model_b} == {"classical", m1}
        )
        assert vote == Vote(**{k: pair[k] for k in VOTE_FIELDS[1:]}) and pair["name"] == name
        assert vote.prompt.startswith("box:") and vote.item.split("/")[0] in dataset["test_ids"]

        # A second pair, judged from the keyboard.
        page.click("#next")
        page.wait_for_selector("#pick-b:not([disabled])")
        page.keyboard.press("2")
        expect(page.locator("#recorded")).to_contain_text(f"votes/{name}@2", timeout=TIMEOUT_MS)
        assert [v.winner for v in read_votes(f"votes/{name}", registry)] == ["a", "b"]
        watch.check()
    finally:
        page.close()
