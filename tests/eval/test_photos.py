"""``reflade eval photos``: the bundled photos, a box and a point prompt each, through a model and classical, as
one picture."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from reflade.engine.classical_decomposer import ClassicalDecomposer
from reflade.engine.schema import decode_image
from reflade.eval.photos import PHOTO_PROMPTS, TILE_HEIGHT, decompose_photos, photo_items, photo_sheet
from reflade.train.model import build_reflayer
from reflade.train.pipeline_reflayer import RefLayerPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prompts_lie_inside_their_photos():
    items = photo_items()
    assert [label.split(":")[0] for label, _, _ in items] == [n for n in PHOTO_PROMPTS for _ in range(2)]
    for _, image, prompt in items:
        h, w = image.shape[:2]
        if prompt["type"] == "box":
            x0, y0, x1, y1 = prompt["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        else:
            ((x, y, label),) = prompt["points"]
            assert 0 <= x < w and 0 <= y < h and label == 1


def test_sheet_of_a_model_and_classical(tiny_vae, tmp_path):
    bundle = build_reflayer("tiny", vae=tiny_vae(), seed=0)
    decomposers = {"tiny": RefLayerPipeline(bundle), "classical": ClassicalDecomposer()}
    items, layers = decompose_photos(decomposers, steps=2)
    assert list(layers) == ["tiny", "classical"]
    for name, out in layers.items():
        assert len(out) == len(items) == 6
        for (_, image, _), layer in zip(items, out, strict=True):
            assert layer.shape == (*image.shape[:2], 4) and layer.dtype == np.uint8, name
    # classical's layer of a box lies in the box (a soft edge may spill): its prompts really reached it
    (_, image, prompt), layer = items[0], layers["classical"][0]
    x0, y0, x1, y1 = prompt["box"]
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    opaque = layer[..., 3] >= 128
    assert opaque[outside].mean() < 0.01 and opaque[~outside].mean() > 0.1

    sheet = photo_sheet(items, layers)
    # six rows of a label line, the tiles (label + picture) and a gap; three tiles per row
    assert sheet.ndim == 3 and sheet.shape[0] == 6 * (16 + TILE_HEIGHT + 16 + 6)
    widest = max(round(im.shape[1] * TILE_HEIGHT / im.shape[0]) for _, im, _ in items)
    assert sheet.shape[1] == 3 * (widest + 6)


def test_cli_writes_the_picture_from_a_model_folder(tiny_vae, tmp_path):
    from reflade.eval.cli import app

    folder = tmp_path / "tiny-model"
    build_reflayer("tiny", vae=tiny_vae(), seed=0).save(folder)
    out = tmp_path / "photos.png"
    res = CliRunner().invoke(app, ["photos", "--model-dir", str(folder), "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "tiny-model, classical" in res.output
    assert decode_image(out.read_bytes(), "RGB").shape[0] == 6 * (16 + TILE_HEIGHT + 16 + 6)
