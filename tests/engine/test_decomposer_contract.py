"""The Decomposer contract (reflade.engine.decompose), checked on both implementations: RefLayer (a tiny random
model) and the classical decomposer (no weights). Plus the shared helpers: input checks and resizing."""

from __future__ import annotations

import numpy as np
import pytest

from reflade.engine.classical_decomposer import ClassicalDecomposer
from reflade.engine.decompose import (
    Decomposer,
    PromptError,
    premultiplied_to_layer,
    prepare,
    resize_layer,
    scale_prompt,
)
from reflade.engine.schema import encode_png
from reflade.engine.synth import make_scene

IMPLS = ("reflayer", "classical")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bundle(tiny_vae):
    from reflade.train.model import build_reflayer
    from reflade.train.text import MiniLMTextEncoder, minilm_folder

    return build_reflayer("tiny", vae=tiny_vae(), text=MiniLMTextEncoder(minilm_folder()))


@pytest.fixture(scope="module")
def decomposers(tiny_bundle) -> dict[str, Decomposer]:
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    return {"reflayer": RefLayerPipeline(tiny_bundle, max_batch=4), "classical": ClassicalDecomposer()}


def run(d: Decomposer, images, prompts, kinds, **kw) -> list[np.ndarray]:
    """A few sampling steps: the contract, not the quality, is under test."""
    return d.decompose(images, prompts, kinds, steps=kw.pop("steps", 2), **kw)


def scene(h: int, w: int, seed: int = 7):
    s = make_scene(seed, size=(h, w), background="texture")
    return s, s.objects[-1]  # the nearest object: fully visible


def check_layer(out: np.ndarray, h: int, w: int) -> None:
    assert out.shape == (h, w, 4) and out.dtype == np.uint8
    assert not out[..., :3][out[..., 3] == 0].any(), "straight alpha: RGB = 0 where alpha = 0"


# ---------------------------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("impl", IMPLS)
def test_layers_come_back_at_each_images_own_size(decomposers, impl):
    d = decomposers[impl]
    assert isinstance(d, Decomposer) and d.name
    sizes = [(90, 70), (60, 120), (64, 64)]
    scenes = [scene(h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    images = [s.image for s, _ in scenes]
    mask = scenes[2][1].visible_mask
    prompts = [
        {"type": "box", "box": list(scenes[0][1].box)},
        {"points": [[int(v) for v in np.argwhere(scenes[1][1].visible_mask)[0][::-1]] + [1]]},
        {"mask": mask},
    ]
    kinds = ["foreground", "background", "foreground"]
    outs = run(d, images, prompts, kinds, seeds=[1, 2, 3])
    assert len(outs) == 3
    for out, (h, w) in zip(outs, sizes, strict=True):
        check_layer(out, h, w)
    if impl == "classical":
        assert (outs[1][..., 3] == 255).all()  # a background is opaque everywhere
        assert outs[0][..., 3].any() and not (outs[0][..., 3] == 255).all()
    assert run(d, [], [], []) == []


@pytest.mark.parametrize("impl", IMPLS)
def test_every_prompt_type_and_both_kinds(decomposers, impl):
    d = decomposers[impl]
    s, obj = scene(96, 80)
    x0, y0, x1, y1 = obj.box
    ys, xs = np.nonzero(obj.visible_mask)
    inside = [int(xs[len(xs) // 2]), int(ys[len(ys) // 2]), 1]
    outside = [0, 0, 0] if not obj.visible_mask[0, 0] else [79, 95, 0]
    text = f"the {obj.color_name} {obj.category}"
    prompts = [
        {"type": "point", "points": [inside, outside]},
        {"type": "box", "box": [x0, y0, x1, y1]},
        {"type": "mask", "mask": encode_png(obj.visible_mask)},  # PNG bytes, as datasets hold it
        {"type": "mask", "granularity": "coarse", "mask": obj.amodal_mask},
        {"type": "text+box", "box": [x0, y0, x1, y1], "text": text},
        {"type": "text+point", "points": [inside], "text": text},
        {"type": "point+box", "points": [inside], "box": [x0, y0, x1, y1]},
        {"type": "text+mask", "mask": obj.visible_mask, "text": text},
    ]
    for kind in ("foreground", "background"):
        outs = run(d, [s.image] * len(prompts), prompts, [kind] * len(prompts), seeds=5, steps=1)
        for out in outs:
            check_layer(out, 96, 80)
            if impl == "classical" and kind == "background":
                assert (out[..., 3] == 255).all()
    text_only = {"type": "text", "text": text}
    if impl == "reflayer":
        check_layer(run(d, [s.image], [text_only], ["background"])[0], 96, 80)
    else:
        with pytest.raises(PromptError, match=r"prompts\[0\] is text only"):
            run(d, [s.image], [text_only], ["foreground"])
        with pytest.raises(PromptError, match="only negative points"):
            run(d, [s.image], [{"points": [outside]}], ["foreground"])


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_by_seed(decomposers, impl):
    d = decomposers[impl]
    s, obj = scene(72, 88)
    prompts = [{"box": list(obj.box)}, {"box": list(obj.box)}]
    kinds = ["foreground", "background"]
    a = run(d, [s.image] * 2, prompts, kinds, seeds=11)
    b = run(d, [s.image] * 2, prompts, kinds, seeds=11)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    if impl == "reflayer":
        c = run(d, [s.image] * 2, prompts, kinds, seeds=12)
        assert not np.array_equal(a[0], c[0])
        # an item's output depends on its own seed, not on its place in the batch
        alone = run(d, [s.image], prompts[1:], kinds[1:], seeds=11)[0]
        assert np.abs(alone.astype(int) - a[1]).max() <= 1


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_are_refused_before_any_compute(decomposers, impl, monkeypatch):
    d = decomposers[impl]

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before refusing bad input")

    monkeypatch.setattr(d, "decompose_batch" if impl == "reflayer" else "_one", no_compute)
    s, obj = scene(90, 70)
    img = s.image
    good = {"box": list(obj.box)}

    def refuse(exc, match, images=None, prompts=None, kinds=None, **kw):
        with pytest.raises(exc, match=match):
            d.decompose(
                images if images is not None else [img, img],
                prompts if prompts is not None else [good, good],
                kinds if kinds is not None else ["foreground", "foreground"],
                **kw,
            )

    # the bad item last: nothing is computed for the good one before it either
    refuse(
        PromptError,
        r"prompts\[1\]: point \[70, 10, 1\] outside the 70x90 image",
        prompts=[good, {"points": [[70, 10, 1]]}],
    )
    refuse(PromptError, "half-open", prompts=[good, {"box": [0, 0, 71, 10]}])
    refuse(PromptError, "mask is 90x70", prompts=[good, {"mask": np.ones((70, 90), bool)}])
    refuse(PromptError, "301 characters", prompts=[good, {"text": "x" * 301, "box": [0, 0, 5, 5]}])
    refuse(PromptError, "empty prompt", prompts=[good, {"text": ""}])
    refuse(PromptError, r"unknown prompt keys \['boxes'\]", prompts=[good, {"boxes": [0, 0, 5, 5]}])
    refuse(PromptError, "granularity", prompts=[good, {"box": [0, 0, 5, 5], "granularity": "medium"}])
    refuse(
        ValueError,
        r"kinds\[1\] is 'fg': a layer kind is one of 'foreground', 'background'",
        kinds=["foreground", "fg"],
    )
    refuse(ValueError, r"kinds\[0\] is None", kinds=[None, "background"])
    refuse(ValueError, "2 images, 2 prompts and 1 kinds", kinds=["foreground"])
    refuse(ValueError, r"images\[1\] must be an HxWx3 uint8", images=[img, img.astype(np.float32)])
    refuse(ValueError, r"images\[0\] must be an HxWx3 uint8", images=[img[..., 0], img])
    refuse(ValueError, "3 seeds for 2 images", seeds=[1, 2, 3])
    refuse(ValueError, r"seeds\[1\] must be an integer", seeds=[1, -2])
    refuse(ValueError, "steps must be an integer of at least 1", steps=0)
    refuse(ValueError, "guidance must be a finite number", guidance=float("nan"))
    refuse(ValueError, "kinds must be a list", kinds="foreground")


# ---------------------------------------------------------------------------------------------- RefLayer only
def test_reflayer_kind_input_changes_the_layer(decomposers):
    d = decomposers["reflayer"]
    assert d.bundle.model.config.layer_kinds == ["foreground", "background"]
    s, obj = scene(80, 80)
    prompt = {"type": "box", "box": list(obj.box)}
    fg, bg = run(d, [s.image] * 2, [prompt] * 2, ["foreground", "background"], seeds=3)
    assert np.abs(fg.astype(int) - bg).max() > 0
    # also with guidance, where both branches ask for the same kind
    fg_g, bg_g = run(d, [s.image] * 2, [prompt] * 2, ["foreground", "background"], seeds=3, guidance=2.5)
    assert not np.array_equal(fg_g, bg_g) and not np.array_equal(fg_g, fg)
    # the person-level call is the same path
    alone = run(d, [s.image], [prompt], ["background"], seeds=3)[0]
    assert np.array_equal(d(s.image, prompt, num_inference_steps=2, seed=3, kind="background"), alone)
    with pytest.raises(ValueError, match="kinds\\[0\\] is 'scene'"):
        d(s.image, prompt, kind="scene")


def test_reflayer_from_registry_decomposes_like_the_saved_model(tiny_bundle, registry, tmp_path):
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    folder = tiny_bundle.save(tmp_path / "model")
    version = registry.create("model", "reflayer", folder, progress=False)
    registry.set_alias(version.ref, "candidate")
    pipe = RefLayerPipeline.from_registry("model/reflayer@candidate", registry, cache_dir=tmp_path / "cache")
    assert pipe.name == f"reflayer:{version.ref}"
    assert pipe.bundle.model.config.layer_kinds == ["foreground", "background"]
    s, obj = scene(60, 90)
    prompts = [{"box": list(obj.box), "text": "a thing"}] * 2
    kinds = ["foreground", "background"]
    here = RefLayerPipeline(tiny_bundle).decompose([s.image] * 2, prompts, kinds, steps=2, seeds=4)
    there = pipe.decompose([s.image] * 2, prompts, kinds, steps=2, seeds=4)
    for a, b in zip(here, there, strict=True):
        # the same weights; float summation order may move a value by one 8-bit level
        assert np.abs(a.astype(int) - b).max() <= 1


# ---------------------------------------------------------------------------------------------- helpers
def test_prepare_normalizes_and_spreads_seeds():
    img = np.zeros((10, 20, 3), np.uint8)
    items = prepare(
        [img, img],
        [{"box": [0, 0, 5, 5]}, {"text": "x", "points": [[1, 2, 1]]}],
        ["foreground", "background"],
        seeds=9,
    )
    assert [it.seed for it in items] == [9, 9]
    assert items[0].prompt["type"] == "box" and items[1].prompt["type"] == "text+point"
    assert (items[1].height, items[1].width) == (10, 20)
    with pytest.raises(PromptError, match="text only"):
        prepare([img], [{"text": "x"}], ["foreground"], refuse_text_only=True)
    # columns as Ray Data hands them over: arrays
    items = prepare(
        np.stack([img, img]), [{"box": [0, 0, 5, 5]}] * 2, np.array(["background"] * 2), seeds=np.arange(2)
    )
    assert [it.kind for it in items] == ["background"] * 2 and [it.seed for it in items] == [0, 1]
    with pytest.raises(ValueError, match="pass a list of images"):
        prepare(img, [{"box": [0, 0, 5, 5]}], ["foreground"])


def test_resizing_is_premultiplied_and_keeps_straight_alpha():
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[10:30, 20:40] = (200, 40, 10, 255)
    rgba[10:30, 40:41] = (200, 40, 10, 128)  # a soft edge
    for h, w in ((20, 30), (80, 120), (33, 17)):
        out = resize_layer(rgba, h, w)
        assert out.shape == (h, w, 4) and out.dtype == np.uint8
        assert not out[..., :3][out[..., 3] == 0].any()
        # resampling premultiplied colour: no dark fringe where the layer meets its empty pixels
        edge = out[..., 3] > 0
        assert (out[..., 0][edge] >= 195).all(), out[..., 0][edge].min()
    assert resize_layer(rgba, 40, 60) is rgba
    premult = np.zeros((4, 4, 4), np.float32)
    premult[..., 3] = 0.5
    premult[..., 0] = 0.25
    out = premultiplied_to_layer(premult, 2, 2)
    assert (out[..., 0] == 128).all() and (out[..., 3] == 128).all()


def test_scale_prompt_maps_points_boxes_and_masks():
    mask = np.zeros((40, 60), bool)
    mask[10:20, 30:60] = True
    p = {"points": [[59, 39, 1], [0, 0, 0]], "box": [30, 10, 60, 20], "mask": mask, "text": "t"}
    q = scale_prompt(p, (40, 60), (20, 30))
    assert q["points"] == [[29, 19, 1], [0, 0, 0]] and q["box"] == [15, 5, 30, 10] and q["text"] == "t"
    assert q["mask"].shape == (20, 30) and q["mask"][5:10, 15:30].all() and q["mask"].sum() == 75
    tiny = scale_prompt({"box": [0, 0, 1, 1], "points": [], "mask": None}, (40, 60), (4, 6))
    assert tiny["box"] == [0, 0, 1, 1]  # still one pixel


def test_classical_works_large_images_at_max_side_and_keeps_their_pixels():
    s, obj = scene(128, 96)
    small = ClassicalDecomposer(max_side=64)
    fg, bg = small.decompose([s.image] * 2, [{"box": list(obj.box)}] * 2, ["foreground", "background"])
    check_layer(fg, 128, 96)
    assert (bg[..., 3] == 255).all() and bg.shape == (128, 96, 4)
    # outside the removed region a background is the image itself, at full resolution
    grown = np.zeros_like(obj.visible_mask)
    ys, xs = np.nonzero(obj.visible_mask)
    grown[max(0, ys.min() - 12) : ys.max() + 13, max(0, xs.min() - 12) : xs.max() + 13] = True
    assert np.array_equal(bg[..., :3][~grown], s.image[~grown])
    assert not np.array_equal(bg[..., :3][grown], s.image[grown])
    a, g = fg[..., 3] >= 128, obj.layer[..., 3] >= 128
    assert (a & g).sum() / (a | g).sum() > 0.6
    with pytest.raises(ValueError, match="max_side must be at least 32"):
        ClassicalDecomposer(max_side=8)
