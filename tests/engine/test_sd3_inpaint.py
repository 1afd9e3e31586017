"""The SD3-family completion backend (``engine.completion_model: sd3-inpaint``) with the tiny random checkpoint:
it fills holes and only holes, batches holes of several images by sampling side with the same results as one
image at a time, runs in bfloat16, encodes the empty prompt with a checkpoint's own text encoders (a real SD3
folder's layout), refuses missing or wrong weights with a clear error, is chosen by the configuration without
changing the defaults, and runs inside the engine on Ray.

Random weights say nothing about quality; every assertion is about shapes, frames, invariants and plumbing.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

import cv2
import numpy as np
import pytest
import torch

from reflade.engine.backends import make_completion_backend
from reflade.engine.backends.neural_completion import NeuralCompletionBackend
from reflade.engine.backends.neural_models import weights_refs
from reflade.engine.backends.sd3_inpaint import (
    SD3InpaintCompletionBackend,
    load_sd3_inpaint,
    resolve_dtype,
)
from reflade.engine.backends.tiny_weights import ALL_TINY_NAMES, TINY_NAMES, register_tiny_weights
from reflade.engine.config import EngineConfig
from reflade.engine.types import Completion, Entity
from reflade.platform.registry import Registry, RegistryError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SD3 = EngineConfig(completion_model="sd3-inpaint")


def _image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([90 + 60 * np.sin(xx / 7.0 + c) * np.cos(yy / 11.0) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def _entities(h: int, w: int, shift: int) -> list[Entity]:
    """A disc (entity 0) partly behind a rectangle (entity 1): a background hole for each, an amodal hole for 0."""
    disc = np.zeros((h, w), np.uint8)
    cv2.circle(disc, (w // 3 + shift, h // 2), min(h, w) // 5, 1, -1)
    rect = np.zeros((h, w), bool)
    rect[h // 3 : 2 * h // 3, w // 3 + shift : w // 2 + shift] = True
    disc = disc.astype(bool) & ~rect
    ents = []
    for i, (m, by) in enumerate(((disc, [1]), (rect, []))):
        ys, xs = np.nonzero(m)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        ents.append(Entity(i, box, m, "cup", 0.9, occluded_by=by))
    return ents


IMAGES = [_image(0, 96, 128), _image(1, 120, 90), _image(2, 80, 80)]
ENTITIES = [_entities(*im.shape[:2], shift=4 * k) for k, im in enumerate(IMAGES)]


@pytest.fixture(scope="module")
def tiny(storage) -> tuple[Registry, dict[str, str]]:
    registry = Registry(storage, prefix=f"registry-sd3-{uuid.uuid4().hex[:10]}")
    return registry, register_tiny_weights(registry, ["tiny-sd3-inpaint"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-cache")


@pytest.fixture(scope="module")
def completion(tiny, cache) -> SD3InpaintCompletionBackend:
    return SD3InpaintCompletionBackend(SD3, registry=tiny[0], cache_dir=cache)


def test_tiny_checkpoint_is_registered_small_and_safetensors_only(tiny):
    registry, refs = tiny
    v = registry.resolve(refs["tiny-sd3-inpaint"])
    paths = {f["path"] for f in v.files}
    assert {"model_index.json", "transformer/config.json", "vae/config.json"} <= paths
    assert "scheduler/scheduler_config.json" in paths
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for p in paths), paths
    assert v.size() < 3_000_000
    # the default set stays what the default configuration loads; the CLI registers every tiny model
    assert "tiny-sd3-inpaint" not in TINY_NAMES and "tiny-sd3-inpaint" in ALL_TINY_NAMES
    assert register_tiny_weights(registry, ["tiny-sd3-inpaint"]) == refs  # same bytes: same version


def test_configuration_selects_it_and_defaults_stay(tiny, cache):
    assert EngineConfig().completion_model == "repaint"
    assert weights_refs(EngineConfig())[2] == "weights/tiny-repaint@latest"
    assert weights_refs(SD3)[2] == "weights/tiny-sd3-inpaint@latest"
    assert SD3.fingerprint() != EngineConfig().fingerprint()
    backend = make_completion_backend("neural", SD3, tiny[0])
    assert isinstance(backend, SD3InpaintCompletionBackend) and backend.name == "sd3-inpaint"
    for refuse in (weights_refs, lambda c: make_completion_backend("neural", c, tiny[0])):
        with pytest.raises(ValueError, match="unknown engine.completion_model 'dalle'"):
            refuse(EngineConfig(completion_model="dalle"))
    cuda = backend.device.type == "cuda"
    assert resolve_dtype("auto", backend.device) == (torch.bfloat16 if cuda else torch.float32)
    with pytest.raises(ValueError, match="unknown engine.completion_dtype 'fp8'"):
        SD3InpaintCompletionBackend(
            dataclasses.replace(SD3, completion_dtype="fp8"), registry=tiny[0], cache_dir=cache
        )


def test_fills_the_holes_and_nothing_else(completion, tiny):
    assert completion.weights == [tiny[1]["tiny-sd3-inpaint"]]
    assert (completion.size, completion.side_multiple, completion.vae_factor) == (64, 8, 4)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * completion.dilate_px + 1,) * 2)
    for image, entities in zip(IMAGES, ENTITIES, strict=True):
        h, w = image.shape[:2]
        comps = completion.complete(image, entities)
        assert len(comps) == len(entities)
        for e, c in zip(entities, comps, strict=True):
            assert isinstance(c, Completion)
            assert c.rgba.shape == (h, w, 4) and c.rgba.dtype == np.uint8
            assert c.background.shape == (h, w, 3) and c.background.dtype == np.uint8
            hole = cv2.dilate(e.mask.astype(np.uint8), kernel).astype(bool)
            assert np.array_equal(c.background[~hole], image[~hole]), "a pixel outside the hole changed"
            assert (c.background[hole] != image[hole]).any(), "the hole was not filled"
            assert np.array_equal(c.rgba[..., :3][e.mask], image[e.mask]), "visible pixels changed"
        # the disc behind the rectangle gains an amodal extent, filled only there
        extra = comps[0].amodal_mask & ~entities[0].mask
        assert extra.any() and not (extra & ~entities[1].mask).any()
        assert comps[0].scores["completed_fraction"] > 0


def test_batching_by_side_matches_one_at_a_time(completion, monkeypatch):
    singles = [completion.complete(im, ents) for im, ents in zip(IMAGES, ENTITIES, strict=True)]
    calls: list[tuple[int, int]] = []
    sample = completion.sample

    def record(images, holes, side):
        calls.append((side, len(holes)))
        return sample(images, holes, side)

    monkeypatch.setattr(completion, "sample", record)
    batched = completion.complete_batch(IMAGES, ENTITIES)
    n_holes = sum(len(e) + 1 for e in ENTITIES)  # a background hole each, an amodal hole for each disc
    assert sum(n for _, n in calls) == n_holes
    assert len(calls) == len({s for s, _ in calls}) < n_holes, "holes sharing a side were not batched"
    for one, many in zip(singles, batched, strict=True):
        for a, b in zip(one, many, strict=True):
            for x, y in ((a.background, b.background), (a.rgba, b.rgba)):
                diff = np.abs(x.astype(int) - y.astype(int))
                # batching changes float summation order only: at most a couple of 8-bit steps, on few pixels
                assert diff.max() <= 2 and (diff > 0).mean() < 0.01
            assert np.array_equal(a.amodal_mask, b.amodal_mask)


def test_bfloat16_runs_and_still_fills_only_the_holes(tiny, cache):
    half = SD3InpaintCompletionBackend(
        dataclasses.replace(SD3, completion_dtype="bfloat16"), registry=tiny[0], cache_dir=cache
    )
    assert half.pipe.transformer.dtype == half.pipe.vae.dtype == half.prompt_embeds.dtype == torch.bfloat16
    image, entities = IMAGES[2], ENTITIES[2]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * half.dilate_px + 1,) * 2)
    for e, c in zip(entities, half.complete(image, entities), strict=True):
        assert c.background.dtype == np.uint8 and c.background.shape == image.shape
        hole = cv2.dilate(e.mask.astype(np.uint8), kernel).astype(bool)
        assert np.array_equal(c.background[~hole], image[~hole])


def test_a_bfloat16_checkpoint_from_weights_dir(tmp_path):
    """The real-size random checkpoint's case on a GPU: a folder saved in bfloat16 (``random_weights``), read
    from ``engine.weights_dir`` and run in bfloat16 (``completion_dtype: auto`` on CUDA), fills only the holes."""
    from reflade.engine.backends.random_weights import write_sd3_inpaint
    from reflade.engine.backends.tiny_weights import TINY_SD3_TRANSFORMER, TINY_SD3_VAE

    write_sd3_inpaint(tmp_path / "sd3-half", TINY_SD3_TRANSFORMER, TINY_SD3_VAE, dtype=torch.bfloat16)
    cfg = dataclasses.replace(
        SD3, weights_dir=str(tmp_path), sd3_weights="weights/sd3-half", completion_dtype="bfloat16"
    )
    half = SD3InpaintCompletionBackend(cfg)
    assert half.weights == ["weights/sd3-half@local"]
    assert half.pipe.transformer.dtype == half.pipe.vae.dtype == torch.bfloat16
    image, entities = IMAGES[2], ENTITIES[2]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * half.dilate_px + 1,) * 2)
    for e, c in zip(entities, half.complete(image, entities), strict=True):
        hole = cv2.dilate(e.mask.astype(np.uint8), kernel).astype(bool)
        assert np.array_equal(c.background[~hole], image[~hole])
        assert (c.background[hole] != image[hole]).any()


def test_a_checkpoint_with_text_encoders_encodes_the_empty_prompt_once(tmp_path):
    """The layout of a real SD3 folder (CLIP text encoders and tokenizers beside the transformer): the empty prompt
    is encoded at load and the text encoders are freed; the tokenizers here are a byte-level stand-in (offline)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from reflade.engine.backends.tiny_weights import build_tiny_sd3_inpaint

    chars = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    end = vocab["<|endoftext|>"]
    encoders = []
    for _ in range(2):  # CLIP-L and CLIP-G stand-ins: widths 16 + 16 = the transformer's joint width (32)
        torch.manual_seed(0)
        cfg = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end,
        )  # fmt: skip
        encoders.append(CLIPTextModelWithProjection(cfg).eval())
    folder = build_tiny_sd3_inpaint(tmp_path / "bare")
    pipe, _, _ = load_sd3_inpaint(folder)  # no text encoders: add them, as a real SD3 folder has them
    pipe.register_modules(
        text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=tok
    )
    pipe.save_pretrained(tmp_path / "full", safe_serialization=True)
    loaded, embeds, pooled = load_sd3_inpaint(tmp_path / "full")
    assert embeds.shape == (1, 77 + 256, 32) and pooled.shape == (1, 32)  # CLIP tokens + SD3's T5 length
    assert embeds.abs().sum() > 0 and loaded.text_encoder is None and loaded.text_encoder_2 is None


def test_seed_changes_the_fill(completion, tiny, cache):
    other = SD3InpaintCompletionBackend(
        dataclasses.replace(SD3, completion_seed=1), registry=tiny[0], cache_dir=cache
    )
    a = completion.complete(IMAGES[0], ENTITIES[0])
    b = other.complete(IMAGES[0], ENTITIES[0])
    assert any(not np.array_equal(x.background, y.background) for x, y in zip(a, b, strict=True))


def test_missing_or_wrong_weights_are_clear_errors(tiny, cache):
    registry = tiny[0]
    missing = dataclasses.replace(SD3, sd3_weights="weights/no-such-sd3@latest")
    with pytest.raises(
        RegistryError, match=r"completion weights 'weights/no-such-sd3@latest' cannot be fetched"
    ):
        SD3InpaintCompletionBackend(missing, registry=registry, cache_dir=cache)
    # a RePaint folder is not an SD3 checkpoint: refused by name, not a traceback from deep inside diffusers
    (repaint,) = register_tiny_weights(registry, ["tiny-repaint"]).values()
    wrong = dataclasses.replace(SD3, sd3_weights=repaint)
    with pytest.raises(ValueError, match="not an SD3-family diffusers checkpoint.*RePaintPipeline"):
        SD3InpaintCompletionBackend(wrong, registry=registry, cache_dir=cache)
    # the RePaint backend is what the default configuration still builds
    assert NeuralCompletionBackend(EngineConfig(), registry=registry, cache_dir=cache).weights == [repaint]


def test_engine_run_with_sd3_completion(storage_config, registry, ray_cluster, tmp_path):
    """The neural family through every stage on Ray with ``completion_model: sd3-inpaint``: the completion actors
    load the SD3 checkpoint from the registry, and the rows' provenance and lineage name it."""
    from reflade.engine.pipeline import run_engine
    from reflade.engine.schema import load_rows, validate_row
    from reflade.engine.synth import make_scene, scene_to_png_bytes
    from reflade.platform.config import load_config

    refs = register_tiny_weights(registry, ["tiny-sam", "tiny-owlv2", "tiny-sd3-inpaint"])
    cfg = load_config(None, env={})
    for f in ("endpoint", "bucket", "region", "access_key_id", "secret_access_key"):
        setattr(cfg.storage, f, getattr(storage_config, f))
    cfg.registry.prefix = registry.prefix.rstrip("/")
    eng = cfg.section("engine")
    eng.batch_size = 2
    eng.completion_model = "sd3-inpaint"
    eng.captioner_weights = ""  # template text only: this test is about completion
    eng.weights_cache = str(tmp_path / "cache")
    eng.layout = "staged"
    (tmp_path / "in").mkdir()
    for i in range(2):
        (tmp_path / "in" / f"scene{i}.png").write_bytes(scene_to_png_bytes(make_scene(seed=900 + i)))
    res = run_engine(cfg, str(tmp_path / "in"), "sd3", backends="neural", progress=False, log=lambda *_: None)
    assert res.images_kept + res.images_quarantined == res.images_in == 2
    assert res.layers_kept > 0
    for r in load_rows(registry, res.dataset):
        validate_row(r, decode=True)
        assert r["provenance"]["backends"]["completion"] == "neural"
        assert sorted(r["provenance"]["weights"]) == sorted(refs.values())
    assert refs["tiny-sd3-inpaint"] in registry.resolve(res.dataset).parents
