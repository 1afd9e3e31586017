"""Synthetic scenes (engine/synth.py): exact ground truth, determinism, valid layers and masks, honest colours."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from reflade.engine.synth import (
    CATEGORIES,
    COLOR_NAMES,
    SynthScene,
    composite,
    make_scene,
    make_scenes,
    scene_to_png_bytes,
)

SEEDS = range(20)

# The test's own reading of the colour words (independent of the generator's palette): hue centre and
# tolerance in degrees for chromatic words; saturation/value bounds for the achromatic ones.
HUES = {
    "red": (0, 20),
    "orange": (30, 15),
    "brown": (28, 15),
    "yellow": (55, 12),
    "green": (120, 35),
    "cyan": (185, 18),
    "blue": (225, 22),
    "purple": (276, 22),
    "pink": (327, 20),
}


@pytest.fixture(scope="module")
def scenes() -> list[SynthScene]:
    """20 seeds with each background kind (40 scenes)."""
    return [make_scene(seed, background=kind) for kind in ("texture", "photo") for seed in SEEDS]


def _reference_over(background: np.ndarray, layers: list[np.ndarray]) -> np.ndarray:
    """Float64 straight-alpha over, rounding after each layer: what ``composite`` must equal."""
    out = background.astype(np.float64)
    for layer in layers:
        a = layer[:, :, 3:4].astype(np.float64)
        out = np.rint((layer[:, :, :3] * a + out * (255.0 - a)) / 255.0)
    return out.astype(np.uint8)


# ---- composite and exactness


def test_composite_matches_reference_over():
    rng = np.random.default_rng(1)
    bg = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    layers = [rng.integers(0, 256, (17, 23, 4), dtype=np.uint8) for _ in range(4)]
    assert np.array_equal(composite(bg, layers), _reference_over(bg, layers))
    opaque = layers[0].copy()
    opaque[:, :, 3] = 255
    assert np.array_equal(composite(bg, [opaque]), opaque[:, :, :3])
    clear = np.zeros_like(opaque)
    assert np.array_equal(composite(bg, [clear]), bg)
    assert np.array_equal(composite(bg, []), bg)


def test_composite_rejects_mismatched_layers():
    bg = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="layer 0 must be 8x8x4"):
        composite(bg, [np.zeros((8, 9, 4), np.uint8)])
    with pytest.raises(ValueError, match="background must be HxWx3 uint8"):
        composite(np.zeros((8, 8, 3), np.float32), [])


def test_image_is_exact_composite_of_background_and_layers(scenes):
    kinds = set()
    for scene in scenes:
        layers = [o.layer for o in scene.objects]
        assert np.array_equal(composite(scene.background, layers), scene.image)
        assert np.array_equal(_reference_over(scene.background, layers), scene.image)
        kinds.add(scene.background_source.split(":")[0])
    assert kinds == {"texture", "photo"}


def test_without_is_exact_composite_of_the_others(scenes):
    for scene in scenes:
        for obj in scene.objects:
            others = [o.layer for o in scene.objects if o.entity_id != obj.entity_id]
            removed = scene.without(obj.entity_id)
            assert removed.shape == scene.image.shape and removed.dtype == np.uint8
            assert np.array_equal(removed, _reference_over(scene.background, others))
            # removing an object changes only pixels its layer touches
            untouched = obj.layer[:, :, 3] == 0
            assert np.array_equal(removed[untouched], scene.image[untouched])
            # and where only it covered the background, the background shows
            alone = obj.layer[:, :, 3] > 0
            for other in scene.objects:
                if other is not obj:
                    alone &= other.layer[:, :, 3] == 0
            assert np.array_equal(removed[alone], scene.background[alone])
        with pytest.raises(ValueError, match="has no entity 99"):
            scene.without(99)


# ---- determinism


def test_same_seed_same_scene_different_seed_different_scene():
    a, b = make_scene(7), make_scene(7)
    assert a.background_source == b.background_source
    assert np.array_equal(a.image, b.image) and np.array_equal(a.background, b.background)
    assert len(a.objects) == len(b.objects)
    for oa, ob in zip(a.objects, b.objects, strict=True):
        assert (oa.category, oa.color_name, oa.box) == (ob.category, ob.color_name, ob.box)
        assert np.array_equal(oa.layer, ob.layer)
        assert np.array_equal(oa.visible_mask, ob.visible_mask)
        assert np.array_equal(oa.amodal_mask, ob.amodal_mask)
    images = [make_scene(seed).image for seed in range(6)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j]), (i, j)


def test_make_scenes_is_deterministic_and_reproducible_by_scene_seed():
    first = list(make_scenes(4, seed=5, size=(96, 128), background="texture"))
    second = list(make_scenes(4, seed=5, size=(96, 128), background="texture"))
    other = list(make_scenes(4, seed=6, size=(96, 128), background="texture"))
    assert len(first) == 4
    assert len({s.seed for s in first}) == 4
    assert {s.seed for s in first}.isdisjoint({s.seed for s in other})
    for s1, s2 in zip(first, second, strict=True):
        assert s1.seed == s2.seed and np.array_equal(s1.image, s2.image)
        assert s1.image.shape == (96, 128, 3)
        again = make_scene(s1.seed, size=(96, 128), background="texture")
        assert np.array_equal(again.image, s1.image)
    for s1, s3 in zip(first, other, strict=True):
        assert not np.array_equal(s1.image, s3.image)


# ---- layers and masks


def test_layers_are_valid_straight_alpha_with_soft_edges(scenes):
    for scene in scenes:
        h, w = scene.image.shape[:2]
        assert scene.image.dtype == np.uint8 and scene.background.shape == (h, w, 3)
        assert [o.entity_id for o in scene.objects] == list(range(len(scene.objects)))
        for obj in scene.objects:
            layer = obj.layer
            assert layer.shape == (h, w, 4) and layer.dtype == np.uint8
            alpha = layer[:, :, 3]
            assert not layer[alpha == 0, :3].any(), "RGB must be 0 where alpha is 0"
            assert np.count_nonzero((alpha > 0) & (alpha < 255)) > 20, "edges must be soft"
            assert obj.category in CATEGORIES and obj.color_name in COLOR_NAMES
            # the body is part of the layer: the layer's alpha is at least the body's there
            assert (alpha[obj.amodal_mask] >= 128).all()


def test_shadows_live_in_the_layer_and_can_be_turned_off():
    for seed in range(5):
        shaded = make_scene(seed, background="texture", shadows=True)
        for obj in shaded.objects:
            alpha = obj.layer[:, :, 3]
            rim = cv2.dilate(obj.amodal_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            beyond = (alpha > 0) & ~rim
            # a soft, dark, semi-transparent shadow reaching well past the body's anti-aliased edge
            assert np.count_nonzero(beyond) > np.count_nonzero(rim & ~obj.amodal_mask)
            assert alpha[beyond].max() < 128
            assert obj.layer[beyond, :3].mean() < 40
        plain = make_scene(seed, background="texture", shadows=False)
        for obj in plain.objects:
            alpha = obj.layer[:, :, 3]
            # without a shadow the layer's alpha is the body's: the amodal mask is exactly alpha >= 0.5
            assert np.array_equal(obj.amodal_mask, alpha >= 128)
            ring = cv2.dilate(obj.amodal_mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            assert not (alpha[~ring] > 0).any()


def test_masks_boxes_and_occlusion_are_consistent(scenes):
    for scene in scenes:
        h, w = scene.image.shape[:2]
        for i, obj in enumerate(scene.objects):
            vis, amodal = obj.visible_mask, obj.amodal_mask
            assert (
                vis.shape == (h, w) and vis.dtype == bool and amodal.shape == (h, w) and amodal.dtype == bool
            )
            assert not (vis & ~amodal).any(), "visible must be inside amodal"
            assert vis.any()
            ys, xs = np.nonzero(vis)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj.occluded_fraction == pytest.approx(1 - vis.sum() / amodal.sum())
            front = scene.objects[i + 1 :]
            for other in front:
                assert not (vis & other.amodal_mask).any(), "a front body at >= 0.5 hides what is behind"
            uncovered = amodal.copy()
            for other in front:
                uncovered &= other.layer[:, :, 3] == 0
            assert not (uncovered & ~vis).any(), "amodal pixels with nothing in front are visible"
            # where the layer is opaque and nothing lies in front, the image shows exactly the layer
            exact = uncovered & (obj.layer[:, :, 3] == 255)
            assert np.array_equal(scene.image[exact], obj.layer[exact][:, :3])


def test_visible_mask_matches_the_definition_without_shadows():
    """Without shadows the layer alpha is the body alpha, so the visible mask can be recomputed exactly."""
    for seed in range(10):
        scene = make_scene(seed, n_objects=(3, 5), shadows=False)
        for i, obj in enumerate(scene.objects):
            transmittance = np.ones(obj.amodal_mask.shape)
            for other in scene.objects[i + 1 :]:
                transmittance = transmittance * ((255.0 - other.layer[:, :, 3]) / 255.0)
            expected = (obj.layer[:, :, 3] >= 128) & (transmittance > 0.5)
            assert np.array_equal(obj.visible_mask, expected)


def test_min_visible_area_bounds_and_some_occlusion(scenes):
    occluded_objects = occluded_scenes = total = 0
    for scene in scenes:
        for obj in scene.objects:
            visible_fraction = obj.visible_mask.sum() / obj.amodal_mask.sum()
            assert visible_fraction >= 0.3
            assert 0.02 <= obj.amodal_mask.mean() <= 0.35
            occluded_objects += obj.occluded_fraction > 0.05
            total += 1
        occluded_scenes += any(o.occluded_fraction > 0.05 for o in scene.objects)
        assert scene.objects[-1].occluded_fraction == 0.0, "nothing is in front of the front object"
    # amodal completion matters: a good share of objects is partly hidden
    assert occluded_scenes >= len(scenes) // 2 and occluded_objects >= total // 4
    strict = [make_scene(seed, n_objects=(5, 6), min_visible=0.7) for seed in range(8)]
    for scene in strict:
        assert 1 <= len(scene.objects) <= 6
        for obj in scene.objects:
            assert obj.visible_mask.sum() >= 0.7 * obj.amodal_mask.sum()


def test_object_counts_follow_n_objects():
    counts = {len(make_scene(seed, n_objects=(2, 4)).objects) for seed in range(30)}
    assert counts <= {1, 2, 3, 4} and {2, 3, 4} <= counts
    assert all(len(make_scene(seed, n_objects=(1, 1)).objects) == 1 for seed in range(3))


# ---- colours


def _hsv(pixels: np.ndarray) -> np.ndarray:
    """Nx3 uint8 RGB -> Nx3 float HSV, hue in degrees, s and v in [0, 1]."""
    return cv2.cvtColor(pixels.reshape(-1, 1, 3).astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV).reshape(-1, 3)


def _circular_mean_deg(hue: np.ndarray) -> float:
    rad = np.deg2rad(hue)
    return float(np.rad2deg(np.arctan2(np.sin(rad).mean(), np.cos(rad).mean())) % 360)


def test_colour_words_are_distinct_and_honest(scenes):
    for scene in [*scenes, *(make_scene(seed, n_objects=(6, 8)) for seed in range(5))]:
        words = [o.color_name for o in scene.objects]
        assert len(set(words)) == len(words), words
        for obj in scene.objects:
            hsv = _hsv(scene.image[obj.visible_mask])
            s, v = float(np.median(hsv[:, 1])), float(np.median(hsv[:, 2]))
            word = obj.color_name
            where = f"seed {scene.seed} entity {obj.entity_id} ({word}): hue/s/v"
            if word in HUES:
                centre, tol = HUES[word]
                hue = _circular_mean_deg(hsv[:, 0])
                assert abs((hue - centre + 180) % 360 - 180) <= tol, f"{where} {hue:.0f} {s:.2f} {v:.2f}"
                assert s > 0.3, f"{where} {hue:.0f} {s:.2f} {v:.2f}"
                if word == "brown":
                    assert v < 0.55, f"{where} {s:.2f} {v:.2f}"
                if word == "orange":
                    assert v > 0.65, f"{where} {s:.2f} {v:.2f}"
            elif word == "white":
                assert s < 0.12 and v > 0.75, f"{where} {s:.2f} {v:.2f}"
            elif word == "gray":
                assert s < 0.12 and 0.3 < v < 0.72, f"{where} {s:.2f} {v:.2f}"
            else:
                assert word == "black" and v < 0.22, f"{where} {s:.2f} {v:.2f}"


# ---- sizes, encoding, arguments


@pytest.mark.parametrize("size", [(192, 320), (320, 192), (64, 64)])
def test_non_square_and_small_sizes(size):
    for seed in range(6):
        scene = make_scene(seed, size=size)
        h, w = size
        assert scene.image.shape == (h, w, 3) and scene.background.shape == (h, w, 3)
        layers = [o.layer for o in scene.objects]
        assert np.array_equal(composite(scene.background, layers), scene.image)
        for obj in scene.objects:
            assert obj.layer.shape == (h, w, 4) and obj.visible_mask.shape == (h, w)
            assert obj.visible_mask.sum() >= 0.3 * obj.amodal_mask.sum() > 0
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_thin_images_fit_every_object():
    # At 50x120 an elongated object scaled to the short side used to get a patch 1 px larger than the image
    # ("high <= 0", or a broadcast error when it was pasted); these seeds hit it.
    for size, seeds in {
        (50, 120): (21, 22, 32, 34, 36, 37),
        (120, 50): (32, 36, 37),
        (32, 64): (36,),
    }.items():
        for seed in seeds:
            scene = make_scene(seed, size=size)
            assert scene.image.shape[:2] == size
            for obj in scene.objects:
                x0, y0, x1, y1 = obj.box
                assert 0 <= x0 < x1 <= size[1] and 0 <= y0 < y1 <= size[0]


def test_png_bytes_decode_to_the_image():
    scene = make_scene(3, size=(80, 120))
    data = scene_to_png_bytes(scene)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB" and img.size == (120, 80)
        assert np.array_equal(np.asarray(img), scene.image)


def test_background_kinds_are_forced_or_drawn_by_seed():
    assert all(make_scene(s, background="texture").background_source.startswith("texture:") for s in range(6))
    assert all(make_scene(s, background="photo").background_source.startswith("photo:") for s in range(6))
    auto = {make_scene(s).background_source.split(":")[0] for s in range(20)}
    assert auto == {"texture", "photo"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "non-negative"),
        ({"size": (16, 64)}, "at least 32"),
        ({"n_objects": (3, 2)}, "fewest"),
        ({"n_objects": (1, 13)}, "fewest"),
        ({"background": "sky"}, "'auto', 'texture', 'photo'"),
        ({"min_visible": 1.5}, r"\[0, 1\]"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    args = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_scene(**args)
