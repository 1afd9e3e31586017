"""The ``neural`` backends with tiny random weights: registry round trip, cache, SAM/OWLv2/BLIP/RePaint data
flow, output invariants, determinism, refusal of corrupt weights, the completion's sampling sides
(``sampling_side``), and the backends inside a Ray Data actor pool.

Random weights say nothing about quality; every assertion here is about shapes, frames, invariants and plumbing.
"""

from __future__ import annotations

import copy
import uuid

import cv2
import numpy as np
import pytest

from reflade.engine.backends.neural_completion import (
    NeuralCompletionBackend,
    sampling_side,
    unet_side_multiple,
)
from reflade.engine.backends.neural_models import DEFAULT_VOCABULARY, load_sam, weights_refs
from reflade.engine.backends.neural_scene import SOURCE, NeuralSceneBackend
from reflade.engine.backends.tiny_weights import LICENSE, TINY_NAMES, register_tiny_weights
from reflade.engine.config import EngineConfig
from reflade.engine.types import Completion, Entity
from reflade.platform.registry import IntegrityError, Registry, RegistryError
from reflade.platform.weights import fetch_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scene(seed: int, h: int, w: int) -> np.ndarray:
    """A textured background with a few overlapping filled shapes (HxWx3 uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([80 + 60 * np.sin(xx / 9.0 + c) * np.cos(yy / 13.0) for c in range(3)], -1)
    img += rng.normal(0, 6, img.shape)
    for _ in range(3):
        color = rng.integers(0, 256, 3).tolist()
        cx, cy = int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), int(rng.integers(h // 8, h // 4)), color, -1)
        else:
            rw, rh = int(rng.integers(w // 8, w // 3)), int(rng.integers(h // 8, h // 3))
            cv2.rectangle(img, (cx - rw, cy - rh), (cx + rw, cy + rh), color, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


IMAGES = [_scene(0, 160, 224), _scene(1, 200, 150), _scene(2, 128, 128)]


def _hull(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(cv2.findNonZero(mask.astype(np.uint8))), 1)
    return out.astype(bool)


@pytest.fixture(scope="module")
def tiny(storage) -> tuple[Registry, dict[str, str]]:
    """One registry (own prefix) holding the tiny models for the whole module."""
    registry = Registry(storage, prefix=f"registry-neural-{uuid.uuid4().hex[:10]}")
    return registry, register_tiny_weights(registry)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-cache")


@pytest.fixture(scope="module")
def scene(tiny, cache) -> NeuralSceneBackend:
    return NeuralSceneBackend(EngineConfig(), registry=tiny[0], cache_dir=cache)


@pytest.fixture(scope="module")
def completion(tiny, cache) -> NeuralCompletionBackend:
    return NeuralCompletionBackend(EngineConfig(), registry=tiny[0], cache_dir=cache)


@pytest.fixture(scope="module")
def detected(scene) -> list[list[Entity]]:
    return scene.detect_batch(IMAGES)


# ---------------------------------------------------------------- weights


def test_register_tiny_weights_is_deterministic_and_dedups(registry):
    refs = register_tiny_weights(registry)
    assert refs == {name: f"weights/{name}@1" for name in TINY_NAMES}
    for ref in refs.values():
        v = registry.resolve(ref)
        assert v.manifest["license"] == LICENSE
        assert v.manifest["source"] == "reflade.engine.backends.tiny_weights"
        paths = {f["path"] for f in v.files}
        # safetensors only: no pickled checkpoint anywhere
        assert any(p.endswith(".safetensors") for p in paths), paths
        assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for p in paths), paths
        assert v.size() < 3_000_000, f"{ref} is not tiny: {v.size()} bytes"
    assert {"config.json", "model.safetensors"} <= {
        f["path"] for f in registry.resolve(refs["tiny-sam"]).files
    }
    assert "tokenizer.json" in {f["path"] for f in registry.resolve(refs["tiny-owlv2"]).files}
    assert {"unet/config.json", "scheduler/scheduler_config.json"} <= {
        f["path"] for f in registry.resolve(refs["tiny-repaint"]).files
    }
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {
        f["path"] for f in registry.resolve(refs["tiny-blip"]).files
    }
    # building again (fresh random init, same seed) gives identical bytes: the registry returns version 1
    assert register_tiny_weights(registry) == refs
    assert all(registry.versions("weights", name) == [1] for name in TINY_NAMES)


def test_weights_refs_defaults():
    assert weights_refs(EngineConfig()) == [
        "weights/tiny-sam@latest",
        "weights/tiny-owlv2@latest",
        "weights/tiny-repaint@latest",
        "weights/tiny-blip@latest",
    ]
    # an empty captioner reference turns the captioner off: no weights, no lineage edge
    assert weights_refs(EngineConfig(captioner_weights=" ")) == weights_refs(EngineConfig())[:3]


def test_fetch_downloads_once_and_repairs_a_damaged_cache(tiny, tmp_path, monkeypatch):
    registry, refs = tiny
    calls = []
    download = registry.download
    monkeypatch.setattr(registry, "download", lambda *a, **k: calls.append(a[0]) or download(*a, **k))
    first = fetch_weights(registry, "weights/tiny-sam", tmp_path)
    assert calls == [refs["tiny-sam"]]
    assert first.downloaded and first.ref == refs["tiny-sam"]
    weights = first.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    second = fetch_weights(registry, "weights/tiny-sam@latest", tmp_path)
    assert not second.downloaded and second.path == first.path
    assert weights.stat().st_mtime_ns == mtime and len(calls) == 1
    # a truncated file in the cache is noticed and replaced by a verified copy
    weights.write_bytes(weights.read_bytes()[:100])
    third = fetch_weights(registry, refs["tiny-sam"], tmp_path)
    sizes = {f["path"]: f["size"] for f in registry.resolve(refs["tiny-sam"]).files}
    assert third.downloaded and weights.stat().st_size == sizes["model.safetensors"] and len(calls) == 2
    assert not [p for p in third.path.parent.iterdir() if p.name.startswith(".")], "temporary folder left"


def test_sam_forward_gives_masks_of_the_image_size(scene, tiny, cache):
    sam = load_sam(fetch_weights(tiny[0], "weights/tiny-sam", cache).path)
    assert sum(p.numel() for p in sam.parameters()) < 200_000
    image = IMAGES[0]
    boxes = np.array([[10.0, 20.0, 120.0, 100.0], [100.0, 50.0, 220.0, 150.0]])
    (masks,) = scene._segment([image], [boxes])
    assert masks.shape == (2, *image.shape[:2]) and masks.dtype == bool
    # clipped to the box grown by 10%
    assert not masks[0][:, 132:].any() and not masks[0][109:, :].any()


def test_corrupt_weights_are_refused(registry, tmp_path):
    (ref,) = register_tiny_weights(registry, ["tiny-sam"]).values()
    v = registry.resolve(ref)
    registry.storage.put_bytes(v.key("model.safetensors"), b"not the weights the manifest describes")
    with pytest.raises(IntegrityError, match=r"SAM weights .*failed verification.*corrupt") as info:
        NeuralSceneBackend(EngineConfig(), registry=registry, cache_dir=tmp_path)
    assert isinstance(info.value.__cause__, IntegrityError)
    assert not list(tmp_path.rglob("model.safetensors")), "a corrupt file reached the cache"
    cfg = EngineConfig()
    cfg.sam_weights = "weights/no-such-model"
    with pytest.raises(RegistryError, match="reflade engine tiny-weights"):
        NeuralSceneBackend(cfg, registry=registry, cache_dir=tmp_path)


# ---------------------------------------------------------------- stage 2


def test_weights_dir_loads_local_folders_without_a_registry(tmp_path, monkeypatch, scene):
    """``engine.weights_dir``: the backends load ``DIR/<name>`` for ``weights/<name>@...`` and never build a
    registry (a GPU machine has no object store); the folder's tiny weights are the registry's (same bytes), so
    the entities are the same; a folder that lacks a model is named with what it holds."""
    from reflade.engine.backends.tiny_weights import build_tiny_weights
    from reflade.platform.registry import Registry as RegistryClass

    def no_registry(*a, **k):
        raise AssertionError("a registry was built although engine.weights_dir is set")

    monkeypatch.setattr(RegistryClass, "from_config", no_registry)
    build_tiny_weights(tmp_path, ["tiny-sam", "tiny-owlv2"])
    cfg = EngineConfig(weights_dir=str(tmp_path), captioner_weights="")
    local = NeuralSceneBackend(cfg)
    assert local.weights == ["weights/tiny-sam@local", "weights/tiny-owlv2@local"]
    found, from_registry = local.detect(IMAGES[0]), scene.detect(IMAGES[0])
    assert [(e.label, e.box, e.occluded_by) for e in found] == [
        (e.label, e.box, e.occluded_by) for e in from_registry
    ]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(found, from_registry, strict=True))
    with pytest.raises(ValueError, match=r"has no folder 'tiny-repaint' \(it holds: tiny-owlv2, tiny-sam\)"):
        NeuralCompletionBackend(cfg)


def test_detect_returns_consistent_entities(scene, tiny, detected):
    assert scene.name == "neural"
    assert scene.weights == [tiny[1]["tiny-sam"], tiny[1]["tiny-owlv2"], tiny[1]["tiny-blip"]]
    cfg = scene.cfg
    occluded = 0
    for image, entities in zip(IMAGES, detected, strict=True):
        h, w = image.shape[:2]
        assert 1 <= len(entities) <= cfg.max_entities
        union = np.zeros((h, w), int)
        for i, e in enumerate(entities):
            assert isinstance(e, Entity) and e.entity_id == i
            assert e.mask.shape == (h, w) and e.mask.dtype == bool
            area = int(e.mask.sum())
            assert cfg.min_entity_area * h * w <= area <= cfg.max_entity_area * h * w
            ys, xs = np.nonzero(e.mask)
            assert e.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= e.box[0] < e.box[2] <= w and 0 <= e.box[1] < e.box[3] <= h
            assert e.label in DEFAULT_VOCABULARY
            assert 0.0 <= e.score <= 1.0 and e.source == SOURCE
            assert set(e.attributes) == {"color", "position", "size"}
            assert all(0 <= j < i for j in e.occluded_by)
            assert isinstance(e.caption, str) and len(e.caption.split()) <= cfg.caption_max_new_tokens
            occluded += bool(e.occluded_by)
            union += e.mask
        assert union.max() == 1, "visible masks overlap"
        assert [e.score for e in entities] == sorted((e.score for e in entities), reverse=True)
    assert occluded, "no occlusion at all: the amodal path would go untested"
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        scene.detect(IMAGES[0].astype(np.float32))


def test_detect_is_deterministic_and_batch_independent(scene, detected):
    single = [scene.detect(im) for im in IMAGES]
    for a_list, b_list in zip(single, detected, strict=True):
        assert [(e.label, e.occluded_by) for e in a_list] == [(e.label, e.occluded_by) for e in b_list]
        for a, b in zip(a_list, b_list, strict=True):
            assert abs(a.score - b.score) < 1e-3
            iou = (a.mask & b.mask).sum() / (a.mask | b.mask).sum()
            assert iou > 0.98
    again = scene.detect(IMAGES[0])
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again, single[0], strict=True))


def test_threshold_and_fallback(tiny, cache):
    cfg = EngineConfig()
    cfg.detector_threshold = 0.999  # no random box scores that high
    strict = copy.copy(cfg)
    strict.detector_fallback = False
    assert NeuralSceneBackend(strict, registry=tiny[0], cache_dir=cache).detect(IMAGES[0]) == []
    assert NeuralSceneBackend(cfg, registry=tiny[0], cache_dir=cache).detect(IMAGES[0])


# ---------------------------------------------------------------- stage 3


def test_complete_keeps_pixels_outside_the_holes(completion, tiny, detected):
    assert completion.name == "neural" and completion.weights == [tiny[1]["tiny-repaint"]]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * completion.dilate_px + 1,) * 2)
    completed_any = False
    for image, entities in zip(IMAGES, detected, strict=True):
        comps = completion.complete(image, entities)
        assert len(comps) == len(entities)
        h, w = image.shape[:2]
        by_id = {e.entity_id: e for e in entities}
        for e, c in zip(entities, comps, strict=True):
            assert isinstance(c, Completion)
            assert c.rgba.shape == (h, w, 4) and c.rgba.dtype == np.uint8
            assert c.background.shape == (h, w, 3) and c.background.dtype == np.uint8
            assert c.amodal_mask.shape == (h, w) and c.amodal_mask.dtype == bool
            alpha = c.rgba[..., 3]
            assert set(np.unique(alpha)) <= {0, 255}
            assert np.array_equal(alpha == 255, c.amodal_mask)
            assert not c.rgba[..., :3][alpha == 0].any(), "RGB must be 0 where alpha is 0"
            assert np.array_equal(c.rgba[..., :3][e.mask], image[e.mask]), "visible pixels changed"
            # the amodal extent adds only occluded pixels: inside the hull, under an occluder
            extra = c.amodal_mask & ~e.mask
            assert not (~c.amodal_mask & e.mask).any()
            front = np.zeros((h, w), bool)
            for j in e.occluded_by:
                front |= by_id[j].mask
            assert not (extra & ~(_hull(e.mask) & front)).any()
            completed_any |= bool(extra.any())
            assert c.scores["completed_fraction"] == pytest.approx(
                extra.sum() / c.amodal_mask.sum(), abs=1e-5
            )
            # background: only the dilated mask may change, and it does (random weights never copy the image)
            hole = cv2.dilate(e.mask.astype(np.uint8), kernel).astype(bool)
            assert np.array_equal(c.background[~hole], image[~hole])
            assert (c.background[hole] != image[hole]).any()
    assert completed_any, "no occluded part was completed"


def test_complete_is_deterministic_and_batch_independent(completion, detected, tiny, cache):
    first = completion.complete(IMAGES[0], detected[0])
    second = completion.complete(IMAGES[0], detected[0])
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.rgba, b.rgba) and np.array_equal(a.background, b.background)
    batched = completion.complete_batch(IMAGES, detected)
    for a, b in zip(first, batched[0], strict=True):
        # batching changes float summation order only: at most one 8-bit step, on few pixels
        diff = np.abs(a.background.astype(int) - b.background.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
        assert np.array_equal(a.amodal_mask, b.amodal_mask)
    cfg = EngineConfig()
    cfg.completion_seed = 1
    reseeded = NeuralCompletionBackend(cfg, registry=tiny[0], cache_dir=cache).complete(
        IMAGES[0], detected[0]
    )
    assert any(not np.array_equal(a.background, b.background) for a, b in zip(first, reseeded, strict=True))


def test_complete_handles_no_entities_and_bad_masks(completion):
    assert completion.complete(IMAGES[0], []) == []
    bad = Entity(0, (0, 0, 1, 1), np.ones((5, 5), bool), "cup", 0.5)
    with pytest.raises(ValueError, match="does not match the image"):
        completion.complete(IMAGES[0], [bad])


# ---------------------------------------------------------------- sampling sides


@pytest.mark.parametrize(
    ("crop", "side"),
    [
        (1, 512), (300, 512), (512, 512), (513, 768), (700, 768), (768, 768), (769, 1024), (1024, 1024),
        (1025, 1024), (4000, 1024),
    ],
)  # fmt: skip
def test_sampling_side_sd3_defaults(crop, side):
    """SD3 at 1024 px: steps of 256 from 512; small crops are not upsampled to 1024, large ones downsampled."""
    assert sampling_side(crop, max_side=1024, step=256, min_side=512, multiple=16) == side


def test_sampling_side_rule():
    for step, min_side, max_side, multiple in [(256, 512, 1024, 16), (16, 32, 64, 4), (64, 100, 256, 32)]:
        for crop in range(1, 2 * max_side):
            side = sampling_side(crop, max_side=max_side, step=step, min_side=min_side, multiple=multiple)
            assert side % multiple == 0 and side % step == 0 or side == max_side
            assert side <= max_side
            if crop <= max_side:
                assert side >= crop  # never downsampled below the model's side
            else:
                assert side == max_side  # only crops larger than the model's side are downsampled
            # never upsampled past the next bucket: less than one step above the crop, or the minimum
            assert side < crop + step or side == min(max_side, -(-min_side // step) * step)
    # the minimum is itself rounded up to the step, and can never exceed the maximum
    assert sampling_side(10, max_side=1024, step=256, min_side=300, multiple=16) == 512
    assert sampling_side(10, max_side=256, step=256, min_side=512, multiple=16) == 256
    assert sampling_side(10, max_side=1024, step=256, min_side=0, multiple=16) == 256


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step": 24}, "multiples of 16"),
        ({"max_side": 1000}, "multiples of 16"),
        ({"step": 0}, "positive"),
        ({"crop_px": 0}, "positive"),
        ({"min_side": -1}, "positive"),
    ],
)
def test_sampling_side_refuses_bad_arguments(kwargs, match):
    args = {"crop_px": 100, "max_side": 1024, "step": 256, "min_side": 512, "multiple": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        sampling_side(args.pop("crop_px"), **args)


def test_unet_side_multiple():
    assert unet_side_multiple((16, 32, 32)) == 4  # the tiny RePaint UNet: 2 downsamplings
    assert unet_side_multiple((128, 256, 512, 512)) == 8  # SD3's VAE: its factor
    assert unet_side_multiple((320, 640, 1280, 1280), vae_factor=8) == 64  # an SD 1.x/2.x inpainting UNet
    with pytest.raises(ValueError, match="at least one level"):
        unet_side_multiple(())


def test_tiny_unet_sampling_sides(completion):
    """The tiny UNet (sample_size 64, 3 levels): buckets of 16 from 32 px, multiples of 4; crops of 64 px and
    more are sampled at 64 px as before."""
    assert (completion.size, completion.side_multiple) == (64, 4)
    assert (completion.bucket_step, completion.min_side) == (16, 32)
    assert [completion.sampling_side(c) for c in (1, 32, 33, 48, 49, 64, 65, 500)] == [
        32,
        32,
        48,
        48,
        64,
        64,
        64,
        64,
    ]
    assert all(completion.sampling_side(c) % completion.side_multiple == 0 for c in range(1, 200))


def test_complete_samples_each_crop_at_its_bucket(completion, monkeypatch):
    """Small holes are sampled at a small side, grouped by side; only the holes' pixels change."""
    image = IMAGES[2]  # 128 x 128
    masks = []
    for x0, y0, side in [(10, 10, 6), (60, 12, 10), (20, 60, 40)]:
        m = np.zeros(image.shape[:2], bool)
        m[y0 : y0 + side, x0 : x0 + side] = True
        masks.append(m)
    entities = [Entity(i, (0, 0, 1, 1), m, "cup", 0.5) for i, m in enumerate(masks)]
    calls = []
    sample = completion.sample

    def spy(images, holes, side):
        calls.append((side, [max(h.crop[2] - h.crop[0], h.crop[3] - h.crop[1]) for h in holes]))
        return sample(images, holes, side)

    monkeypatch.setattr(completion, "sample", spy)
    comps = completion.complete(image, entities)
    # background holes: the masks dilated by 4 px (14, 18 and 48 px) -> crops of 32, 36 and 96 px
    assert calls == [(32, [32]), (48, [36]), (64, [96])]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * completion.dilate_px + 1,) * 2)
    for m, c in zip(masks, comps, strict=True):
        hole = cv2.dilate(m.astype(np.uint8), kernel).astype(bool)
        assert np.array_equal(c.background[~hole], image[~hole])
        assert (c.background[hole] != image[hole]).any()


# ---------------------------------------------------------------- Ray


def test_backends_run_in_a_ray_actor_pool(ray_cluster, tiny, tmp_path):
    ray = ray_cluster
    registry, refs = tiny

    class NeuralStages:
        """Stages 2 and 3 in one actor: weights fetched once per actor from the worker's own credentials."""

        def __init__(self, prefix: str, cache_dir: str):
            from reflade.engine.backends.neural_completion import NeuralCompletionBackend
            from reflade.engine.backends.neural_scene import NeuralSceneBackend
            from reflade.engine.config import EngineConfig
            from reflade.platform.config import load_config
            from reflade.platform.registry import Registry
            from reflade.platform.storage import Storage

            reg = Registry(Storage.from_config(load_config()), prefix)
            self.scene = NeuralSceneBackend(EngineConfig(), registry=reg, cache_dir=cache_dir)
            self.completion = NeuralCompletionBackend(EngineConfig(), registry=reg, cache_dir=cache_dir)

        def __call__(self, batch):
            images = [
                cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                for b in batch["png"]
            ]
            entities = self.scene.detect_batch(images)
            completions = self.completion.complete_batch(images, entities)
            kept = []
            for image, ents, comps in zip(images, entities, completions, strict=True):
                kept.append(
                    all(
                        np.array_equal(c.rgba[..., :3][e.mask], image[e.mask])
                        for e, c in zip(ents, comps, strict=True)
                    )
                )
            return {
                "name": batch["name"],
                "entities": np.array([len(e) for e in entities]),
                "layers": np.array([len(c) for c in completions]),
                "labels": np.array([",".join(e.label for e in ents) for ents in entities]),
                "visible_kept": np.array(kept),
                "weights": np.array([",".join(self.scene.weights + self.completion.weights)] * len(images)),
            }

    items = [
        {"name": f"img{i}", "png": cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes()}
        for i, im in enumerate(IMAGES)
    ]
    ds = ray.data.from_items(items).map_batches(
        NeuralStages,
        fn_constructor_kwargs={"prefix": registry.prefix, "cache_dir": str(tmp_path / "worker-cache")},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=2,
        num_cpus=0.5,
    )
    rows = sorted(ds.take_all(), key=lambda r: r["name"])
    assert [r["name"] for r in rows] == ["img0", "img1", "img2"]
    for r in rows:
        assert r["entities"] >= 1 and r["layers"] == r["entities"]
        assert all(label in DEFAULT_VOCABULARY for label in r["labels"].split(","))
        assert r["visible_kept"]
        assert r["weights"].split(",") == [
            refs["tiny-sam"],
            refs["tiny-owlv2"],
            refs["tiny-blip"],
            refs["tiny-repaint"],
        ]
    assert (tmp_path / "worker-cache" / "weights" / "tiny-sam").is_dir(), "the worker did not use its cache"
