"""Stages 4-6: classical matting, prompt generation, post-filter.

The matting is scored against a drawn scene whose true alpha is known (a soft-edged disc rendered at 4x and
downsampled), and run on real bundled photos (scikit-image's coffee and chelsea) with rough masks.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from reflade.engine.backends.classical_matting import ClassicalMattingBackend, clean_mask, refine_masks
from reflade.engine.config import EngineConfig
from reflade.engine.schema import GRANULARITIES, validate_prompt
from reflade.engine.stages.postfilter import Verdict, check_layer
from reflade.engine.stages.prompts import (
    PROMPT_TYPES,
    decode_mask_png,
    encode_mask_png,
    make_prompts,
    text_for,
)
from reflade.engine.types import Completion, Entity

FG_COLOUR = (230, 40, 25)


def _disc_alpha(h: int, w: int, center: tuple[float, float], radius: float, soft_px: float) -> np.ndarray:
    """HxW float alpha of a disc with a soft edge, drawn at 4x supersampling and area-downsampled."""
    s = 4
    big = np.zeros((h * s, w * s), np.uint8)
    cv2.circle(big, (round(center[0] * s), round(center[1] * s)), round(radius * s), 255, -1, cv2.LINE_AA)
    big = cv2.GaussianBlur(big, (0, 0), soft_px * s)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _textured_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """HxWx3 float in [0, 1]: smooth random colour blobs, bluish-green so the red disc stands out."""
    blobs = cv2.resize(
        rng.random((h // 8, w // 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC
    )
    bg = np.clip(0.15 + 0.6 * blobs, 0.0, 1.0)
    bg[..., 0] *= 0.5
    return bg


def _drawn_scene(h: int = 160, w: int = 192, seed: int = 0):
    """(image uint8, true alpha float, foreground colour uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    alpha = _disc_alpha(h, w, (w * 0.5, h * 0.5), min(h, w) * 0.3, soft_px=1.5)
    fg = np.empty((h, w, 3), np.float32)
    fg[:] = np.array(FG_COLOUR, np.float32) / 255.0
    fg += 0.02 * rng.standard_normal((h, w, 3)).astype(np.float32)
    fg = np.clip(fg, 0.0, 1.0)
    img = alpha[..., None] * fg + (1.0 - alpha[..., None]) * _textured_background(h, w, rng)
    return _to_uint8(img), alpha, _to_uint8(fg)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _completion_from(image: np.ndarray, amodal: np.ndarray, visible: np.ndarray, hidden_colour) -> Completion:
    rgba = np.zeros(image.shape[:2] + (4,), np.uint8)
    rgba[amodal, :3] = hidden_colour
    rgba[visible, :3] = image[visible]
    rgba[amodal, 3] = 255
    return Completion(rgba=rgba, amodal_mask=amodal, background=image.copy())


def _assert_valid_rgba(layer: np.ndarray, image: np.ndarray) -> None:
    assert layer.shape == image.shape[:2] + (4,)
    assert layer.dtype == np.uint8
    assert not layer[layer[..., 3] == 0, :3].any(), "RGB must be 0 where alpha is 0"


@pytest.fixture(scope="module")
def backend() -> ClassicalMattingBackend:
    return ClassicalMattingBackend(EngineConfig(matting_band_px=6))


# ---------------------------------------------------------------- stage 4: matting


def test_matting_recovers_soft_edge_better_than_binary_mask(backend):
    image, true_alpha, _ = _drawn_scene()
    mask = true_alpha > 0.5
    layer = backend.refine(image, _completion_from(image, mask, mask, FG_COLOUR), mask)
    _assert_valid_rgba(layer, image)

    edge = mask ^ cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    band = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3) <= 4
    alpha = layer[..., 3] / 255.0
    mae_matte = float(np.abs(alpha - true_alpha)[band].mean())
    mae_binary = float(np.abs(mask - true_alpha)[band].mean())
    assert mae_matte < 0.5 * mae_binary, (mae_matte, mae_binary)
    # The soft edge is really soft: many band pixels are strictly between 0 and 255.
    assert ((layer[..., 3] > 0) & (layer[..., 3] < 255))[band].mean() > 0.3

    opaque = mask & (layer[..., 3] == 255)
    assert opaque.sum() > 0.8 * cv2.erode(mask.astype(np.uint8), np.ones((13, 13), np.uint8)).sum()
    np.testing.assert_array_equal(layer[opaque, :3], image[opaque])
    # Far outside the disc nothing is left.
    far = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3) > 8
    assert not layer[far, 3].any()


def test_matting_foreground_colour_is_unmixed(backend):
    """In the semi-transparent band the layer's colour is the disc's, not the image's mix with the background."""
    image, true_alpha, fg = _drawn_scene(seed=1)
    mask = true_alpha > 0.5
    layer = backend.refine(image, _completion_from(image, mask, mask, FG_COLOUR), mask)
    soft = (true_alpha > 0.25) & (true_alpha < 0.75) & (layer[..., 3] > 0)
    err_layer = np.abs(layer[soft, :3].astype(float) - fg[soft]).mean()
    err_image = np.abs(image[soft].astype(float) - fg[soft]).mean()
    assert err_layer < 0.5 * err_image, (err_layer, err_image)


def test_matting_keeps_completed_edges_and_occlusion_boundary(backend):
    """Behind an occluder: no matting, opaque hidden part with the completion's colour, 1-px anti-aliased edge."""
    h, w = 160, 192
    image, true_alpha, _ = _drawn_scene(h, w, seed=2)
    amodal = true_alpha > 0.5
    occluder = np.zeros((h, w), bool)
    occluder[:, w // 2 + 10 :] = True  # the right part of the disc is hidden behind a grey wall
    image[occluder] = (128, 128, 128)
    visible = amodal & ~occluder
    completed_colour = (200, 60, 40)
    layer = backend.refine(image, _completion_from(image, amodal, visible, completed_colour), visible)
    _assert_valid_rgba(layer, image)

    hidden = amodal & ~visible
    hidden_inner = hidden & cv2.erode(amodal.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert (layer[hidden_inner, 3] == 255).all()
    assert (layer[hidden_inner, :3] == completed_colour).all()
    # The occlusion boundary (visible pixels next to the hidden part) stays opaque: the entity continues there.
    occ_edge = visible & cv2.dilate(hidden.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    occ_edge &= true_alpha > 0.999  # off the soft outer edge of the disc
    assert occ_edge.sum() > 20 and (layer[occ_edge, 3] == 255).all()
    # The hidden outline is anti-aliased within 1 px, not matted against the wall.
    hidden_region = np.zeros((h, w), bool)
    hidden_region[:, w // 2 + 20 :] = True
    outline = amodal ^ cv2.erode(amodal.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    soft = hidden_region & (layer[..., 3] > 0) & (layer[..., 3] < 255)
    assert soft.sum() >= (outline & hidden_region).sum()
    near = cv2.distanceTransform((~outline).astype(np.uint8), cv2.DIST_L2, 3) <= 1.5
    assert (soft <= near).all()
    dist_out = cv2.distanceTransform((~amodal).astype(np.uint8), cv2.DIST_L2, 3)
    assert not layer[hidden_region & (dist_out > 2), 3].any()


@pytest.mark.parametrize("photo", ["coffee", "chelsea"])
def test_matting_on_bundled_photos_with_rough_mask(backend, photo):
    image = getattr(skdata, photo)()
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 5, h // 4), 15, 0, 360, 1, -1)
    mask = mask.astype(bool)
    layer = backend.refine(image, _completion_from(image, mask, mask, (0, 0, 0)), mask)
    _assert_valid_rgba(layer, image)
    a = layer[..., 3]
    assert ((a > 0) & (a < 255)).any(), "the visible boundary was matted"
    assert (a[cv2.erode(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)] == 255).all()
    verdict = check_layer(layer, image, mask, "foreground")
    assert verdict.ok, verdict.reason


def test_mask_refinement_removes_specks_and_small_holes():
    mask = np.zeros((100, 100), bool)
    mask[20:80, 20:80] = True
    mask[45:48, 45:48] = False  # a small hole
    mask[30:60, 62:72] = False  # a large hole (10% of the area): real, kept
    mask[5, 5] = True  # a speck
    mask[90:92, 90:92] = True  # a speck
    out = clean_mask(mask)
    assert out[46, 46] and not out[45, 66]
    assert not out[5, 5] and not out[90:92, 90:92].any()
    assert out[20:80, 20:30].all()

    visible = np.zeros((50, 50), bool)
    visible[10:20, 10:20] = True
    amodal = np.zeros((50, 50), bool)
    amodal[10:30, 10:20] = True
    amodal[12, 12] = False
    vis, amo = refine_masks(visible, amodal)
    assert not (vis & ~amo).any() and amo[12, 12]
    assert clean_mask(np.zeros((5, 5), bool)).sum() == 0


def test_matting_rejects_bad_inputs(backend):
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    comp = _completion_from(image, mask, mask, (0, 0, 0))
    with pytest.raises(ValueError, match="visible_mask"):
        backend.refine(image, comp, np.zeros((10, 20), bool))
    with pytest.raises(ValueError, match="image"):
        backend.refine(image.astype(np.float32), comp, mask)
    # An entity with nothing visible keeps its (empty) extent and stays valid.
    _assert_valid_rgba(backend.refine(image, comp, mask), image)


# ---------------------------------------------------------------- stage 5: prompts


def _entity(mask: np.ndarray, **attributes) -> Entity:
    ys, xs = np.nonzero(mask)
    return Entity(
        entity_id=3,
        box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        mask=mask,
        label="round object",
        score=0.9,
        attributes=attributes or {"color": "red", "position": "left", "size": "small"},
    )


@pytest.fixture
def blob():
    """A non-square image (W=120, H=90) with an L-shaped visible mask, so x/y swaps show."""
    mask = np.zeros((90, 120), bool)
    mask[20:60, 10:30] = True
    mask[45:60, 10:70] = True
    return mask


def test_prompts_cover_every_type_and_granularity_with_exact_schema(blob):
    cfg = EngineConfig(points_per_prompt=4)
    prompts = make_prompts(_entity(blob), blob, (90, 120), np.random.default_rng(0), cfg)
    assert {(p["type"], p["granularity"]) for p in prompts} == {
        (t, g) for t in PROMPT_TYPES for g in GRANULARITIES
    }
    for p in prompts:
        assert set(p) == {"type", "granularity", "points", "box", "mask", "text"}
        assert ("point" in p["type"]) == bool(p["points"])
        assert ("box" in p["type"]) == (p["box"] is not None)
        assert (p["type"] == "mask") == (p["mask"] is not None)
        assert ("text" in p["type"]) == (p["text"] is not None)
        for point in p["points"]:
            assert len(point) == 3 and all(type(v) is int for v in point)
        if p["box"] is not None:
            assert len(p["box"]) == 4 and all(type(v) is int for v in p["box"])
        validate_prompt(p, 120, 90)  # the sample schema's own check
    json.dumps([{k: v for k, v in p.items() if k != "mask"} for p in prompts])  # plain Python values only


def test_prompt_points_and_boxes_are_valid(blob):
    h, w = blob.shape
    cfg = EngineConfig(points_per_prompt=3)
    for seed in range(20):
        prompts = {
            (p["type"], p["granularity"]): p
            for p in make_prompts(_entity(blob), blob, (h, w), np.random.default_rng(seed), cfg)
        }
        for p in prompts.values():
            for x, y, label in p["points"]:
                assert 0 <= x < w and 0 <= y < h
                assert blob[y, x] == bool(label), (p["type"], p["granularity"], x, y, label)
        coarse, fine = prompts[("point", "coarse")]["points"], prompts[("point", "fine")]["points"]
        assert len(coarse) == 1 and coarse[0][2] == 1
        assert sum(lab for *_, lab in fine) == 3 and 1 <= sum(1 - lab for *_, lab in fine) <= 2
        assert prompts[("text+point", "fine")]["points"] == fine

        fine_box = prompts[("box", "fine")]["box"]
        assert fine_box == [10, 20, 70, 60]
        cx0, cy0, cx1, cy1 = prompts[("box", "coarse")]["box"]
        assert 0 <= cx0 < cx1 <= w and 0 <= cy0 < cy1 <= h
        assert cx0 < 10 and cy0 < 20 and cx1 > 70 and cy1 > 60
        assert (cx1 - cx0) * (cy1 - cy0) < 1.3 * 60 * 40

    # Box clipped to the image when the mask touches its border.
    edge = np.zeros((90, 120), bool)
    edge[0:30, 90:120] = True
    box = {
        p["type"] + p["granularity"]: p["box"]
        for p in make_prompts(_entity(edge), edge, (90, 120), np.random.default_rng(1))
    }["boxcoarse"]
    assert box[1] == 0 and box[3] <= 90 and box[2] == 120 and box[0] < 90


def test_prompt_masks_round_trip(blob):
    prompts = make_prompts(_entity(blob), blob, (90, 120), np.random.default_rng(0))
    by = {p["granularity"]: p["mask"] for p in prompts if p["type"] == "mask"}
    fine = decode_mask_png(by["fine"])
    np.testing.assert_array_equal(fine, blob)
    coarse = decode_mask_png(by["coarse"])
    assert coarse.shape == blob.shape and (coarse >= blob).all() and coarse.sum() > blob.sum()
    png = encode_mask_png(blob)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(np.unique(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED))) == {0, 255}
    with pytest.raises(ValueError, match="PNG"):
        decode_mask_png(b"not a png")


def test_prompts_are_deterministic_given_the_seed(blob):
    ent = _entity(blob)
    a = make_prompts(ent, blob, (90, 120), np.random.default_rng(42))
    b = make_prompts(ent, blob, (90, 120), np.random.default_rng(42))
    assert a == b
    others = [make_prompts(ent, blob, (90, 120), np.random.default_rng(s)) for s in range(5)]
    assert any(o != a for o in others)


def test_prompt_text_mentions_colour_position_and_kind(blob):
    ent = _entity(blob, color="red", position="top-left", size="small")
    fine = text_for(ent)
    assert "red" in fine and "top left" in fine and "small" in fine and "round object" in fine
    coarse = text_for(ent, granularity="coarse")
    assert "red" in coarse and "round object" in coarse and "left" not in coarse
    assert text_for(_entity(blob)) == "the small red round object on the left"
    # Stage 2 writes positions as "<horizontal> <vertical>".
    for position, phrase in [
        ("left top", "at the top left"),
        ("center bottom", "at the bottom"),
        ("right middle", "on the right"),
        ("center middle", "in the center"),
    ]:
        assert text_for(_entity(blob, color="blue", position=position)) == f"the blue round object {phrase}"
    bg = text_for(_entity(blob), kind="background")
    assert bg == "the scene without the small red round object on the left"
    prompts = make_prompts(ent, blob, (90, 120), np.random.default_rng(0), kind="background")
    assert all(p["text"].startswith("the scene without") for p in prompts if p["text"])
    # Bounded length even with a very long label.
    long = Entity(
        entity_id=0,
        box=(0, 0, 1, 1),
        mask=blob,
        label="very " * 60 + "long thing",
        score=1.0,
        attributes={"color": "dark olive green", "position": "bottom right", "size": "large"},
    )
    for kind in ("foreground", "background"):
        for g in GRANULARITIES:
            assert 0 < len(text_for(long, kind, granularity=g)) <= 120
    # Missing attributes are left out, not printed as "None".
    bare = Entity(entity_id=0, box=(0, 0, 1, 1), mask=blob, label="cup", score=1.0)
    assert text_for(bare) == "the cup"


def test_prompts_reject_bad_inputs(blob):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="height, width"):
        make_prompts(_entity(blob), blob, (120, 90), rng)
    with pytest.raises(ValueError, match="empty"):
        make_prompts(_entity(blob), np.zeros_like(blob), (90, 120), rng)
    with pytest.raises(ValueError, match="complement"):
        make_prompts(_entity(blob), ~blob, (90, 120), rng, kind="background")
    with pytest.raises(ValueError, match="kind"):
        make_prompts(_entity(blob), blob, (90, 120), rng, kind="middle")


# ---------------------------------------------------------------- stage 6: post-filter


@pytest.fixture
def scene():
    """(image, visible mask, a good foreground layer): a 100x100 image, a 30x30 visible square, 30x40 amodal."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    visible = np.zeros((100, 100), bool)
    visible[30:60, 30:60] = True
    layer = np.zeros((100, 100, 4), np.uint8)
    layer[30:60, 30:70, :3] = (200, 20, 20)
    layer[visible, :3] = image[visible]
    layer[30:60, 30:70, 3] = 255
    return image, visible, layer


def _code(v: Verdict) -> str | None:
    assert v.ok == (v.reason is None)
    if v.reason is not None:
        code, detail = v.reason.split(": ", 1)
        assert code == v.code and detail
    assert {"alpha_fraction", "visible_change", "amodal_ratio"} <= set(v.scores)
    return v.code


def test_postfilter_accepts_a_good_foreground_layer(scene):
    image, visible, layer = scene
    v = check_layer(layer, image, visible, "foreground")
    assert _code(v) is None
    assert v.scores["alpha_fraction"] == pytest.approx(0.12)
    assert v.scores["visible_change"] == 0.0
    assert v.scores["amodal_ratio"] == pytest.approx(40 / 30)


def test_postfilter_foreground_rejections(scene):
    image, visible, good = scene
    cfg = EngineConfig()

    bad = good.copy()
    bad[0:5, 0:5, :3] = 7  # colour where alpha is 0
    assert _code(check_layer(bad, image, visible, "foreground")) == "invalid_rgba"
    assert _code(check_layer(good[..., :3], image, visible, "foreground")) == "invalid_rgba"
    assert _code(check_layer(good.astype(np.float32), image, visible, "foreground")) == "invalid_rgba"

    assert _code(check_layer(np.zeros_like(good), image, visible, "foreground")) == "empty_alpha"
    tiny = np.zeros_like(good)
    tiny[30:33, 30:33] = (*image[30, 30], 255)
    tiny[30:33, 30:33, :3] = image[30:33, 30:33]
    assert _code(check_layer(tiny, image, visible, "foreground", cfg)) == "empty_alpha"

    full = np.dstack([image, np.full((100, 100), 255, np.uint8)])
    v = check_layer(full, image, np.ones((100, 100), bool), "foreground")
    assert _code(v) == "full_alpha" and v.scores["alpha_fraction"] == 1.0

    changed = good.copy()
    changed[visible, :3] = 255 - image[visible]  # the completion repainted what was visible
    v = check_layer(changed, image, visible, "foreground")
    assert _code(v) == "visible_changed" and v.scores["visible_change"] > cfg.max_visible_change
    # A change within the tolerance passes; a change only where alpha < 255 is not compared.
    slight = good.copy()
    slight[visible, :3] = np.clip(image[visible].astype(int) + 5, 0, 255).astype(np.uint8)
    assert _code(check_layer(slight, image, visible, "foreground")) is None

    huge = good.copy()
    huge[10:95, 10:95, :3] = (200, 20, 20)
    huge[visible, :3] = image[visible]
    huge[10:95, 10:95, 3] = 255
    v = check_layer(huge, image, visible, "foreground")
    assert _code(v) == "implausible_size" and v.scores["amodal_ratio"] > 4


def test_postfilter_background(scene):
    image, entity_visible, _ = scene
    kept = ~entity_visible  # the row's visible_mask: pixels not covered by the removed entity
    filled = image.copy()
    filled[entity_visible] = (90, 90, 90)
    good = np.dstack([filled, np.full((100, 100), 255, np.uint8)])
    v = check_layer(good, image, kept, "background")
    assert _code(v) is None and v.scores["visible_change"] == 0.0 and v.scores["alpha_fraction"] == 1.0

    holed = good.copy()
    holed[entity_visible, 3] = 0
    holed[entity_visible, :3] = 0
    assert _code(check_layer(holed, image, kept, "background")) == "invalid_rgba"
    assert _code(check_layer(good[:50], image, kept, "background")) == "invalid_rgba"

    smeared = good.copy()
    smeared[kept, :3] = cv2.GaussianBlur(image, (0, 0), 3)[kept]
    v = check_layer(smeared, image, kept, "background")
    assert _code(v) == "visible_changed" and v.scores["visible_change"] > 12


def test_postfilter_rejects_caller_errors(scene):
    image, visible, layer = scene
    with pytest.raises(ValueError, match="kind"):
        check_layer(layer, image, visible, "both")
    with pytest.raises(ValueError, match="visible_mask"):
        check_layer(layer, image, visible[:10], "foreground")
