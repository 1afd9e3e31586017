"""The neural backend's captioner (a tiny random-init BLIP from the registry) and how captions become text
prompts: loading by reference, batched captions of entity crops (deterministic, bounded), the crop rule, the
sanitiser's cases, the fallback to the template text, and prompts that validate through the schema.

Random weights caption junk: every assertion is about plumbing, bounds and the sanitiser, never about quality.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest

from reflade.engine.backends.neural_captioner import NeuralCaptioner, caption_crop
from reflade.engine.backends.neural_models import DEFAULT_CAPTIONER_WEIGHTS, weights_refs
from reflade.engine.backends.neural_scene import NeuralSceneBackend
from reflade.engine.backends.tiny_weights import register_tiny_weights
from reflade.engine.config import EngineConfig
from reflade.engine.schema import validate_prompt
from reflade.engine.stages.prompts import (
    MAX_CAPTION_WORDS,
    MAX_TEXT_CHARS,
    caption_text,
    make_prompts,
    sanitize_caption,
    text_for,
)
from reflade.engine.types import Entity
from reflade.platform.registry import Registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blip(storage, tmp_path_factory) -> tuple[Registry, str, str]:
    """(registry, exact reference, cache folder) holding only the tiny captioner."""
    registry = Registry(storage, prefix=f"registry-captioner-{uuid.uuid4().hex[:10]}")
    (ref,) = register_tiny_weights(registry, ["tiny-blip"]).values()
    return registry, ref, str(tmp_path_factory.mktemp("captioner-cache"))


@pytest.fixture(scope="module")
def captioner(blip) -> NeuralCaptioner:
    return NeuralCaptioner(EngineConfig(), registry=blip[0], cache_dir=blip[2])


def _crops() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (90, 30), (7, 5)]]
    crops.append(np.full((64, 64, 3), (200, 30, 20), np.uint8))
    return crops


# ---------------------------------------------------------------- the captioner


def test_tiny_captioner_loads_from_the_registry(blip, captioner):
    registry, ref, _ = blip
    assert ref == "weights/tiny-blip@1" and captioner.weights == [ref]
    files = {f["path"] for f in registry.resolve(ref).files}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "preprocessor_config.json"} <= files
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for p in files), files
    tok = captioner.blip.tokenizer
    text_cfg = captioner.blip.model.config.text_config
    # BLIP's ids: BERT's uncased WordPiece vocabulary, [DEC] after it starts a caption, [SEP] ends one
    assert tok.convert_tokens_to_ids("[DEC]") == text_cfg.bos_token_id == 30522
    assert tok.sep_token_id == text_cfg.sep_token_id == 102 and tok.pad_token_id == 0
    assert tok.tokenize("a red cup on the table") == ["a", "red", "cup", "on", "the", "table"]
    assert captioner.max_new_tokens == EngineConfig().caption_max_new_tokens
    assert DEFAULT_CAPTIONER_WEIGHTS == EngineConfig().captioner_weights == "weights/tiny-blip@latest"


def test_captions_are_batched_deterministic_and_bounded(captioner):
    crops = _crops()
    first = captioner.caption(crops)
    assert len(first) == len(crops) and all(isinstance(c, str) for c in first)
    for c in first:
        assert len(c.split()) <= captioner.max_new_tokens and len(c) <= 300
        assert c == " ".join(c.split())
    assert captioner.caption(crops) == first, "greedy captions of the same crops changed"
    assert captioner.caption([]) == []
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        captioner.caption([crops[0].astype(np.float32)])


def test_caption_length_follows_the_configuration(blip):
    registry, _, cache = blip
    short = NeuralCaptioner(EngineConfig(caption_max_new_tokens=2), registry=registry, cache_dir=cache)
    assert all(len(c.split()) <= 2 for c in short.caption(_crops()))
    # more than the decoder's position embeddings allow is capped: [DEC] + 31 tokens for the tiny model
    long = NeuralCaptioner(EngineConfig(caption_max_new_tokens=1000), registry=registry, cache_dir=cache)
    assert long.max_new_tokens == 31
    with pytest.raises(ValueError, match="at least 1"):
        NeuralCaptioner(EngineConfig(caption_max_new_tokens=0), registry=registry, cache_dir=cache)
    with pytest.raises(ValueError, match="captioner_weights is empty"):
        NeuralCaptioner(EngineConfig(captioner_weights=""), registry=registry, cache_dir=cache)


def test_caption_entities_sets_every_caption(captioner):
    images = [
        np.random.default_rng(i).integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8) for i in range(2)
    ]
    mask = np.zeros((50, 70), bool)
    ents = [
        [Entity(0, (5, 5, 30, 40), mask, "cup", 0.9), Entity(1, (40, 10, 70, 50), mask, "dog", 0.8)],
        [Entity(0, (0, 0, 10, 10), mask, "cat", 0.7)],
    ]
    captioner.caption_entities(images, ents)
    got = [e.caption for es in ents for e in es]
    assert all(isinstance(c, str) for c in got)
    crops = [caption_crop(images[0], (5, 5, 30, 40)), caption_crop(images[0], (40, 10, 70, 50))]
    crops.append(caption_crop(images[1], (0, 0, 10, 10)))
    assert got == captioner.caption(crops)
    with pytest.raises(ValueError, match="entity lists"):
        captioner.caption_entities(images, ents[:1])


def testcaption_crop_is_the_box_with_a_margin():
    image = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    crop = caption_crop(image, (50, 20, 150, 60))  # 100 x 40 box: 15 x 6 px margins
    assert crop.shape == (52, 130, 3)
    assert np.array_equal(crop, image[14:66, 35:165])
    assert caption_crop(image, (0, 0, 4, 4)).shape == (6, 6, 3)  # at least 2 px, clipped at the border
    assert caption_crop(image, (190, 90, 200, 100)).shape == (12, 12, 3)


def test_scene_backend_captions_its_entities_unless_disabled(blip):
    registry, ref, cache = blip
    register_tiny_weights(registry, ["tiny-sam", "tiny-owlv2"])
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    scene = NeuralSceneBackend(EngineConfig(), registry=registry, cache_dir=cache)
    assert scene.weights[-1] == ref and scene.captioner is not None
    entities = scene.detect(image)
    assert entities and all(isinstance(e.caption, str) for e in entities)
    off = NeuralSceneBackend(EngineConfig(captioner_weights=""), registry=registry, cache_dir=cache)
    assert off.captioner is None and len(off.weights) == 2
    assert all(e.caption is None for e in off.detect(image))
    assert weights_refs(EngineConfig(captioner_weights="")) == weights_refs(EngineConfig())[:3]


# ---------------------------------------------------------------- the sanitiser


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a red mug on a table", "a red mug on a table"),
        ("[DEC] a red cup [SEP] [PAD] [PAD]", "a red cup"),
        ("[CLS] [unused12] a dog [MASK] [UNK]", "a dog"),
        ("<|endoftext|></s> a cat <pad>", "a cat"),
        ("a  dog\t\nrunning \x00 fast", "a dog running fast"),
        ("a play ##ing child", "a playing child"),
        ("[SEP] ##ing ##ly dog", "dog"),
        ("naïve café ﬁsh", "naive cafe fish"),
        ("北京 tower ☃", "tower"),
        ("the the the cat cat on a mat.", "the cat on a mat"),
        ("... , a dog .", "a dog"),
        ("A Dog a dog", "A Dog a dog"),
    ],
)
def test_sanitize_caption(raw, clean):
    assert sanitize_caption(raw) == clean


@pytest.mark.parametrize(
    "junk", ["", None, "   ", "[SEP] [PAD]", "[unused3] ##", "1 2 3 %%", "x y z", "北京", "\x00\x01", "##s"]
)
def test_unusable_captions_become_empty(junk):
    assert sanitize_caption(junk) == ""


def test_long_captions_are_bounded():
    words = [f"w{i}ord" for i in range(50)]
    out = sanitize_caption(" ".join(words))
    assert out.split() == words[:MAX_CAPTION_WORDS]
    assert sanitize_caption(" ".join(words), max_words=3) == "w0ord w1ord w2ord"
    long = " ".join(["elephant"] + ["giraffe" + "s" * i for i in range(40)])
    out = sanitize_caption(long, max_words=100)
    assert len(out) <= MAX_TEXT_CHARS and long.startswith(out) and not out.endswith(" ")
    assert sanitize_caption("a" * 500) == ""  # one word longer than the limit: nothing fits


# ---------------------------------------------------------------- captions in the prompts


def _entity(caption, position="left top", mask=None) -> Entity:
    if mask is None:
        mask = np.zeros((40, 50), bool)
        mask[10:30, 5:25] = True
    attrs = {"color": "red", "position": position, "size": "small"}
    return Entity(0, (5, 10, 25, 30), mask, "cup", 0.9, attributes=attrs, caption=caption)


def test_fine_text_uses_the_caption_and_coarse_the_template():
    ent = _entity("[DEC] a red mug with a handle [SEP]")
    assert text_for(ent) == "a red mug with a handle, at the top left"
    assert text_for(ent, "background") == "the scene without a red mug with a handle, at the top left"
    assert text_for(ent, granularity="coarse") == "the red cup"
    assert caption_text(ent) == text_for(ent)
    # a caption that already says where the entity is gets no second position phrase
    assert text_for(_entity("a mug at the top left")) == "a mug at the top left"
    assert text_for(_entity("a mug", position="")) == "a mug"


@pytest.mark.parametrize("caption", [None, "", "[SEP]", "##ing [unused1]", "%%%"])
def test_fine_text_falls_back_to_the_template(caption):
    ent = _entity(caption)
    assert caption_text(ent) is None
    assert text_for(ent) == "the small red cup at the top left"
    assert text_for(ent, "background") == "the scene without the small red cup at the top left"


def test_caption_prompts_validate_and_stay_within_the_limit():
    long = " ".join(f"word{i}" for i in range(60))
    for caption, kind in [("a red mug", "foreground"), (long, "background"), ("x" * 400, "foreground")]:
        ent = _entity(caption)
        prompts = make_prompts(ent, ent.mask, (40, 50), np.random.default_rng(0), kind=kind)
        texts = {p["granularity"]: p["text"] for p in prompts if p["text"]}
        assert texts["coarse"].endswith("the red cup")
        assert texts["fine"] == text_for(ent, kind)
        for p in prompts:
            validate_prompt(p, 50, 40)
            if p["text"]:
                assert (
                    0 < len(p["text"]) <= MAX_TEXT_CHARS and p["text"].isascii() and p["text"].isprintable()
                )
    # the captioned text replaces only the fine text; everything spatial is the same as without a caption
    plain = make_prompts(_entity(None), _entity(None).mask, (40, 50), np.random.default_rng(0))
    captioned = make_prompts(_entity("a mug"), _entity(None).mask, (40, 50), np.random.default_rng(0))
    for a, b in zip(plain, captioned, strict=True):
        assert {k: v for k, v in a.items() if k != "text"} == {k: v for k, v in b.items() if k != "text"}
        if a["granularity"] == "coarse":
            assert a["text"] == b["text"]


def test_entity_caption_defaults_to_none():
    ent = Entity(0, (0, 0, 1, 1), np.ones((1, 1), bool), "cup", 1.0)
    assert ent.caption is None
    assert dataclasses.replace(ent, caption="a cup").caption == "a cup"
