"""RefLayer: the tiny model's shapes and gradients, the pipeline, save/load, an overfit run, and the sd3-medium
builder on a tiny random SD3-style checkpoint served from the registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from reflade.engine.synth import make_scene
from reflade.train.bundle import RefLayerBundle
from reflade.train.canvas import PromptError, canvas_batch, empty_canvas
from reflade.train.losses import (
    alpha_decoder_loss,
    autocast,
    encode_batch,
    flow_matching_loss,
    premultiply_over_grey,
)
from reflade.train.model import build_reflayer, count_parameters
from reflade.train.pipeline_reflayer import RefLayerPipeline
from reflade.train.reflayer import RefLayer
from reflade.train.text import (
    MINILM_LICENSE,
    MINILM_SOURCE,
    MiniLMTextEncoder,
    SD3TextEncoder,
    import_minilm,
    load_text_encoder,
    minilm_folder,
)

R = 64
FORBIDDEN = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(minilm_folder())


@pytest.fixture(scope="module")
def bundle(minilm, tiny_vae) -> RefLayerBundle:
    return build_reflayer("tiny", vae=tiny_vae(), text=minilm)


def scenes_batch(n: int = 4):
    """n synthetic 64 px samples: image, the farthest object's layer, a box prompt around it, its name."""
    scenes = [make_scene(seed, size=(R, R)) for seed in range(n)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    layers = torch.stack(
        [torch.from_numpy(s.objects[0].layer).permute(2, 0, 1).float() / 255 for s in scenes]
    )
    prompts = [{"type": "text+box", "box": list(s.objects[0].box), "text": None} for s in scenes]
    texts = [f"the {s.objects[0].color_name} {s.objects[0].category}" for s in scenes]
    for p, t in zip(prompts, texts, strict=True):
        p["text"] = t
    return scenes, images, layers, prompts, texts


@pytest.fixture(scope="module")
def batch(bundle):
    scenes, images, layers, prompts, texts = scenes_batch()
    canvases = canvas_batch(prompts, R, R)
    return encode_batch(bundle, images, layers, canvases, texts)


def _image(h: int = 90, w: int = 70) -> np.ndarray:
    return make_scene(7, size=(h, w)).image


# ---------------------------------------------------------------------------------------------- the model
def test_tiny_parts_sizes_and_initialisation(bundle):
    m, vae = bundle.model, bundle.vae
    assert bundle.resolution == R and bundle.vae_scale_factor == 4 and bundle.latent_channels == 4
    t = m.transformer.config
    assert (t.num_layers, t.num_attention_heads, t.attention_head_dim) == (2, 4, 32)
    # the three latents (noisy target, image, canvas) enter side by side; out: the clean target latent
    assert (t.in_channels, t.out_channels, m.prediction) == (12, 4, "sample")
    assert 0.8e6 < count_parameters(m.transformer) < 1.5e6
    # the text encoder's widths feed the transformer directly: no extra projection
    assert isinstance(m.text_proj, torch.nn.Identity) and isinstance(m.pooled_proj, torch.nn.Identity)
    assert t.joint_attention_dim == t.pooled_projection_dim == 384
    # compress starts as the identity on all three latents
    x = torch.randn(2, 12, 16, 16)
    torch.testing.assert_close(m.compress(x), x, rtol=0, atol=0)
    # alpha decoder: the VAE decoder's layout and weights, one output channel (the mean of the RGB rows)
    a, d = m.alpha_decoder, vae.decoder
    assert len(a.up_blocks) == len(d.up_blocks) and a.conv_out.out_channels == 1
    sa, sd = a.state_dict(), d.state_dict()
    assert set(sa) == set(sd)
    for k in sd:
        if k.startswith("conv_out."):
            torch.testing.assert_close(sa[k], sd[k].mean(0, keepdim=True))
        else:
            assert torch.equal(sa[k], sd[k]), k
    # frozen parts
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert not any(p.requires_grad for p in bundle.text_encoder.parameters())
    assert isinstance(bundle.scheduler, FlowMatchEulerDiscreteScheduler)


def test_encode_batch_shapes_and_target(bundle, batch):
    assert batch["image"].shape == batch["canvas"].shape == batch["target"].shape == (4, 4, 16, 16)
    assert batch["text_hidden"].shape == (4, 32, 384) and batch["text_pooled"].shape == (4, 384)
    assert batch["alpha"].shape == (4, 1, R, R)
    # the target is the layer over mid-grey: premultiplied in [-1, 1], 0 where the layer is empty
    layers = torch.rand(2, 4, 8, 8)
    layers[0, 3] = 0
    t = premultiply_over_grey(layers)
    assert torch.equal(t[0], torch.zeros(3, 8, 8))
    torch.testing.assert_close(t[1], (layers[1, :3] * 2 - 1) * layers[1, 3])
    with pytest.raises(ValueError, match="batch sizes differ"):
        encode_batch(bundle, torch.zeros(2, 3, R, R), None, torch.zeros(1, 3, R, R), ["a", "b"])


def test_losses_reach_only_their_phase(bundle, batch):
    m = bundle.model
    m.zero_grad(set_to_none=True)
    loss = flow_matching_loss(bundle, batch, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for part in (m.transformer, m.compress):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None for p in m.alpha_decoder.parameters())
    assert all(p.grad is None for p in bundle.vae.parameters())
    assert all(p.grad is None for p in bundle.text_encoder.parameters())

    m.zero_grad(set_to_none=True)
    aloss = alpha_decoder_loss(bundle, batch)
    assert aloss.dim() == 0 and torch.isfinite(aloss)
    aloss.backward()
    assert all(p.grad is not None for p in m.alpha_decoder.parameters())
    assert all(p.grad is None for p in m.transformer.parameters())
    assert all(p.grad is None for p in bundle.vae.parameters())
    # (B, H, W) targets work too; a wrong size is refused
    alpha_decoder_loss(bundle, batch, batch["alpha"][:, 0])
    with pytest.raises(ValueError, match="alpha targets"):
        alpha_decoder_loss(bundle, batch, torch.zeros(4, 1, 32, 32))
    m.zero_grad(set_to_none=True)
    assert {id(p) for p in m.phase_parameters("alpha")} == {id(p) for p in m.alpha_decoder.parameters()}
    with pytest.raises(ValueError, match="unknown training phase"):
        m.phase_parameters("vae")


def test_condition_dropout_uses_the_empty_text_and_canvas(bundle, batch):
    with torch.no_grad():
        dropped = flow_matching_loss(bundle, batch, torch.Generator().manual_seed(3), 1.0, 1.0)
        hidden, pooled = bundle.empty_text()
        empty = {
            **batch,
            "text_hidden": hidden.expand_as(batch["text_hidden"]),
            "text_pooled": pooled.expand_as(batch["text_pooled"]),
            "canvas": bundle.encode_pixels(empty_canvas(R, R)).expand_as(batch["canvas"]),
        }
        by_hand = flow_matching_loss(bundle, empty, torch.Generator().manual_seed(3), 0.0, 0.0)
        kept = flow_matching_loss(bundle, batch, torch.Generator().manual_seed(3), 0.0, 0.0)
    # with rate 1 every row is dropped, and the dropout draws come after the noise: same noise in both
    assert dropped.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert dropped.item() != kept.item()  # (an untrained model barely reads its conditions)
    assert torch.equal(bundle.empty_text()[0], bundle.text_encoder.encode([""])[0])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(bundle, batch):
    m = bundle.model

    def run():
        m.zero_grad(set_to_none=True)
        loss = flow_matching_loss(bundle, batch, torch.Generator().manual_seed(5), 0.0, 0.0)
        loss.backward()
        return loss.item(), m.compress.weight.grad.clone()

    plain = run()
    bundle.set_gradient_checkpointing(True)
    try:
        assert m.transformer.gradient_checkpointing
        ckpt = run()
    finally:
        bundle.set_gradient_checkpointing(False)
    assert not m.transformer.gradient_checkpointing
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    torch.testing.assert_close(ckpt[1], plain[1], rtol=1e-4, atol=1e-6)
    m.zero_grad(set_to_none=True)


def test_bf16_autocast_is_for_cuda_only():
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", enabled=True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_returns_rgba_of_the_input_size(bundle):
    pipe = RefLayerPipeline(bundle)
    image = _image(90, 70)
    prompt = {"type": "text+box", "box": [10, 20, 50, 70], "text": "the red disc"}
    plain = pipe(image, prompt, num_inference_steps=3, guidance_scale=1.0, seed=0)
    guided = pipe(image, prompt, num_inference_steps=3, guidance_scale=3.0, seed=0)
    for out in (plain, guided):
        assert out.shape == (90, 70, 4) and out.dtype == np.uint8
        assert not out[..., :3][out[..., 3] == 0].any()  # straight alpha: RGB = 0 where alpha = 0
    assert not np.array_equal(plain, guided)
    # a point prompt with a mask array on a landscape image
    mask = np.zeros((50, 120), bool)
    mask[10:30, 40:90] = True
    out = pipe(_image(50, 120), {"points": [[60, 20, 1], [5, 5, 0]], "mask": mask}, num_inference_steps=2)
    assert out.shape == (50, 120, 4) and out.dtype == np.uint8


def test_pipeline_is_deterministic_with_a_seed(bundle):
    pipe = RefLayerPipeline(bundle)
    image, prompt = _image(), {"type": "point", "points": [[30, 40, 1]]}
    a = pipe(image, prompt, num_inference_steps=3, seed=11)
    b = pipe(image, prompt, num_inference_steps=3, seed=11)
    c = pipe(image, prompt, num_inference_steps=3, seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_decompose_batch_tensor_path(bundle):
    pipe = RefLayerPipeline(bundle)
    _, images, _, prompts, texts = scenes_batch(2)
    canvases = canvas_batch(prompts, R, R)
    out = pipe.decompose_batch(images, canvases, texts, num_inference_steps=2, seed=[1, 2])
    assert out.shape == (2, 4, R, R) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.all(out[:, :3][(out[:, 3:4] <= 0.5 / 255).expand(-1, 3, -1, -1)] == 0)
    # per-row seeds: row 0 alone with seed 1 is row 0 of the batch
    one = pipe.decompose_batch(images[:1], canvases[:1], texts[:1], num_inference_steps=2, seed=1)
    torch.testing.assert_close(one[0], out[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        pipe.decompose_batch(images[:, :, :32, :32], canvases[:, :, :32, :32], texts)


def test_stage_timings_and_channels_last_give_the_same_layer(bundle):
    _, images, _, prompts, texts = scenes_batch(2)
    canvases = canvas_batch(prompts, R, R)
    plain = RefLayerPipeline(bundle)
    ref = plain.decompose_batch(images, canvases, texts, num_inference_steps=2, seed=3)
    assert plain.last_stages == {}  # not recorded unless asked
    staged = RefLayerPipeline(bundle, record_stages=True)
    try:
        bundle.set_channels_last(True)
        assert bundle.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert bundle.model.alpha_decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = staged.decompose_batch(images, canvases, texts, num_inference_steps=2, seed=3)
    finally:
        bundle.set_channels_last(False)
    assert bundle.vae.decoder.conv_in.weight.is_contiguous()
    # the same computation in another memory layout: equal up to float summation order
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)
    assert list(staged.last_stages) == ["encode", "sample", "decode_rgb", "decode_alpha", "finish"]
    assert all(v >= 0 for v in staged.last_stages.values()) and staged.last_stages["sample"] > 0


def test_pipeline_validates_before_any_compute():
    # No model at all: a bad prompt or image must be refused before the pipeline touches it.
    pipe = RefLayerPipeline(None)
    image = _image()
    with pytest.raises(PromptError, match="outside the 70x90 image"):
        pipe(image, {"type": "point", "points": [[70, 10, 1]]})
    with pytest.raises(PromptError, match="half-open"):
        pipe(image, {"box": [0, 0, 71, 10]})
    with pytest.raises(PromptError, match="mask is 90x70"):
        pipe(image, {"mask": np.ones((70, 90), bool)})
    with pytest.raises(PromptError, match="301 characters"):
        pipe(image, {"text": "x" * 301})
    with pytest.raises(PromptError, match="empty prompt"):
        pipe(image, {"text": ""})
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        pipe(image.astype(np.float32), {"text": "a"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(image, {"text": "a"}, num_inference_steps=0)


def test_kind_embedding_is_added_to_the_pooled_text(bundle):
    m = bundle.model
    assert m.layer_kinds == ("foreground", "background")
    assert m.config.layer_kinds == ["foreground", "background"]  # in the saved config
    w = m.kind_embedding.weight
    assert w.shape == (2, 384) and not w[0].any()  # foreground starts at zero: the pooled text as it is
    assert 0.2 < float(w[1].detach().std()) < 0.4  # background starts about as far away as another text
    assert torch.equal(m.kind_index(["background", "foreground"]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="unknown layer kind"):
        m.kind_index(["scene"])
    g = torch.Generator().manual_seed(0)
    x, img, can = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    t = torch.full((2,), 500.0)
    hidden, pooled = bundle.text_encoder.encode(["", ""])
    with torch.no_grad():
        none = m(x, img, can, t, hidden, pooled)
        fg = m(x, img, can, t, hidden, pooled, torch.tensor([0, 0]))
        both = m(x, img, can, t, hidden, pooled, torch.tensor([0.0, 1.0]))  # float indices, as cached
    assert torch.equal(none, fg)  # no kind: foreground
    assert torch.equal(both[0], fg[0]) and not torch.allclose(both[1], fg[1])
    with pytest.raises(ValueError, match="3 layer kinds for a batch of 2"):
        m(x, img, can, t, hidden, pooled, torch.tensor([0, 1, 0]))


def test_a_model_without_kinds_refuses_a_background(bundle):
    from reflade.train.reflayer import RefLayer

    old = RefLayer(
        transformer_config=dict(bundle.model.config.transformer_config),
        alpha_decoder_config=dict(bundle.model.config.alpha_decoder_config),
        latent_channels=4,
        text_hidden_dim=384,
        text_pooled_dim=384,
    )
    assert old.kind_embedding is None and old.layer_kinds is None
    legacy = RefLayerBundle(
        model=old,
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        scheduler=bundle.scheduler,
        config=dict(bundle.config),
    )
    pipe = RefLayerPipeline(legacy)
    image, prompt = _image(), {"box": [5, 5, 40, 40]}
    assert pipe(image, prompt, num_inference_steps=1).shape == (90, 70, 4)
    with pytest.raises(ValueError, match="no layer-kind input"):
        pipe(image, prompt, num_inference_steps=1, kind="background")


# ---------------------------------------------------------------------------------------------- save / load
def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _public(config) -> dict:
    """A config's public keys as JSON has them (a tuple saved comes back a list)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def assert_same_bundle(a: RefLayerBundle, b: RefLayerBundle) -> None:
    """What save/load must keep exactly: every weight (values, dtype, layout), every config, the text spec; and
    every tensor in fresh (64-byte aligned) storage, the invariant that makes equal weights compute equal bits."""
    for part in ("model", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for k, v in sa.items():
            w = sb[k]
            assert v.dtype == w.dtype and v.stride() == w.stride() and torch.equal(v, w), f"{part}.{k}"
        for m in (getattr(a, part), getattr(b, part)):
            misaligned = [n for n, p in m.named_parameters() if p.data_ptr() % 64]
            assert not misaligned, f"{part}: parameters outside fresh storage: {misaligned[:5]}"
    assert _public(a.model.config) == _public(b.model.config)
    assert _public(a.vae.config) == _public(b.vae.config)
    assert _public(a.scheduler.config) == _public(b.scheduler.config)
    assert a.text_encoder.spec() == b.text_encoder.spec()
    assert {k: v for k, v in a.config.items() if k != "ref"} == {
        k: v for k, v in b.config.items() if k != "ref"
    }


PIXEL_LEVELS = 1
"""Two separately built bundles with equal weights may still round a float differently (BLAS kernels choose their
summation order by memory layout and thread count): at most this many 8-bit levels apart ..."""
PIXEL_FRACTION = 1e-3
"""... in at most this fraction of the values."""


def assert_pixels_close(a: np.ndarray, b: np.ndarray) -> None:
    """RGBA uint8 outputs of two separately built, equally weighted bundles: equal within the stated tolerance."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= PIXEL_LEVELS, f"max diff {diff.max()} levels"
    assert (diff > 0).mean() <= PIXEL_FRACTION, f"{(diff > 0).sum()} of {diff.size} values differ"


def test_save_then_load_gives_identical_outputs(bundle, tmp_path):
    folder = bundle.save(tmp_path / "model")
    files = _files(folder)
    assert {"bundle.json", "reflayer/config.json", "reflayer/diffusion_pytorch_model.safetensors"} <= files
    assert {"scheduler/scheduler_config.json", "vae/config.json", "text_encoder/model.safetensors"} <= files
    assert not [f for f in files if f.endswith(FORBIDDEN)]
    doc = json.loads((folder / "bundle.json").read_text())
    assert doc["preset"] == "tiny" and doc["resolution"] == R and doc["base_weights"] is None
    assert doc["components"] == {"vae": {"path": "vae"}, "text_encoder": {"path": "text_encoder"}}
    config = json.loads((folder / "reflayer/config.json").read_text())
    assert config["_class_name"] == "RefLayer" and config["transformer_config"]["num_layers"] == 2

    loaded = RefLayerBundle.load(folder)
    assert_same_bundle(bundle, loaded)
    image, prompt = _image(), {"type": "text+box", "box": [5, 5, 60, 80], "text": "the blue star"}
    for guidance in (1.0, 2.5):
        a = RefLayerPipeline(bundle)(image, prompt, num_inference_steps=3, guidance_scale=guidance, seed=4)
        b = RefLayerPipeline(loaded)(image, prompt, num_inference_steps=3, guidance_scale=guidance, seed=4)
        assert_pixels_close(a, b)
    with pytest.raises(ValueError, match="not a RefLayer model folder"):
        RefLayerBundle.load(tmp_path)


# ---------------------------------------------------------------------------------------------- overfit
def test_overfit_four_samples(minilm, tiny_vae):
    """60 Adam steps on 4 synthetic samples. Measured here (the tiny preset's clean-latent loss): the fixed-draw
    loss falls from 1.80 to 0.13 (0.07x), and swapping the samples' conditions (image, canvas, text) costs 60% over
    the right ones (0.21). The sampler's side of overfitting is tests/train/test_overfit.py."""
    bundle = build_reflayer("tiny", vae=tiny_vae(), text=minilm, seed=1)
    _, images, layers, prompts, texts = scenes_batch(4)
    latents = encode_batch(bundle, images, layers, canvas_batch(prompts, R, R), texts)
    # A fixed evaluation set: the 4 samples x 8 draws of (noise level, noise), the same draws every time.
    probe = {k: v.repeat(8, *([1] * (v.dim() - 1))) for k, v in latents.items()}

    def fixed_loss(lat) -> float:
        with torch.no_grad():
            return flow_matching_loss(bundle, lat, torch.Generator().manual_seed(1234), 0.0, 0.0).item()

    initial = fixed_loss(probe)
    opt = torch.optim.Adam(bundle.model.phase_parameters("transformer"), lr=2e-3)
    bundle.model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = flow_matching_loss(bundle, latents, g, 0.0, 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = fixed_loss(probe)
    print(f"\nfixed-draw loss {initial:.4f} -> {final:.4f}")
    assert final < 0.5 * initial, (initial, final)
    perm = [1, 2, 3, 0]
    swapped = dict(probe)
    for k in ("image", "canvas", "text_hidden", "text_pooled"):
        swapped[k] = latents[k][perm].repeat(8, *([1] * (latents[k].dim() - 1)))
    wrong = fixed_loss(swapped)
    print(f"with the conditions swapped: {wrong:.4f}")
    assert wrong > 1.05 * final, "the model ignores its conditions"

    # the alpha phase on the same latents
    opt = torch.optim.Adam(bundle.model.phase_parameters("alpha"), lr=2e-3)
    with torch.no_grad():
        a0 = alpha_decoder_loss(bundle, latents).item()
    for _ in range(15):
        loss = alpha_decoder_loss(bundle, latents)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        a1 = alpha_decoder_loss(bundle, latents).item()
    assert a1 < 0.8 * a0, (a0, a1)


# ---------------------------------------------------------------------------------------------- registry
def test_tiny_from_registry_references(registry, minilm, tmp_path, tiny_vae):
    ref = import_minilm(registry)
    assert ref == "weights/minilm-l6@1"
    v = registry.resolve(ref)
    assert v.manifest["license"] == MINILM_LICENSE and v.manifest["source"] == MINILM_SOURCE
    assert "model.safetensors" in {f["path"] for f in v.files}
    assert import_minilm(registry) == ref  # identical content: the same version

    tiny_vae().save_pretrained(tmp_path / "vae")
    vae_ref = registry.create("weights", "tiny-vae", tmp_path / "vae", progress=False).ref
    bundle = build_reflayer(
        "tiny",
        vae="weights/tiny-vae@latest",
        text="weights/minilm-l6",
        registry=registry,
        cache_dir=tmp_path / "c",
    )
    assert bundle.config["sources"] == {"vae": vae_ref, "text_encoder": ref}
    # the same weights as the packaged MiniLM (exactly), hence the same embeddings (up to float rounding)
    for k, v in minilm.state_dict().items():
        assert torch.equal(bundle.text_encoder.state_dict()[k], v), k
    h1, p1 = bundle.text_encoder.encode(["", "the red disc"])
    h2, p2 = minilm.encode(["", "the red disc"])
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    assert torch.equal(bundle.vae.decoder.conv_out.weight, tiny_vae().decoder.conv_out.weight)
    with pytest.raises(ValueError, match="weights/tiny-vae"):
        build_reflayer("tiny")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_reflayer("huge", vae=tiny_vae())
    with pytest.raises(ValueError, match="unknown preset fields"):
        build_reflayer("tiny", vae=tiny_vae(), text=minilm, num_blocks=3)


# ---------------------------------------------------------------------------------------------- SD3
_WORDS = "the a red green blue disc square star on left right of background".split()


def _word_tokenizer(*, bos: str | None, eos: str, pad: str, max_len: int):
    """A word-level tokenizer built offline (the ``tokenizers`` package), saved like a real one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = [pad, "<unk>"] + ([bos] if bos else []) + [eos]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(special + sorted(_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ends = ([bos] if bos else []) + [eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}" if bos else f"$A {eos}", special_tokens=[(t, vocab[t]) for t in ends]
    )
    kw = {"bos_token": bos} if bos else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token="<unk>", model_max_length=max_len, **kw
    )
    return fast, vocab


def build_tiny_sd3(dest: Path) -> Path:
    """A diffusers SD3 checkpoint folder with tiny random parts: CLIP widths 8 and 16 (padded to T5's 32),
    pooled 8 + 16, a 4-level VAE with 16 latent channels (8x), a 1-block transformer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for tok_dir, enc_dir, width, pad in (
            ("tokenizer", "text_encoder", 8, "<|endoftext|>"),  # CLIP-L pads with its end token
            ("tokenizer_2", "text_encoder_2", 16, "!"),
        ):
            tok, vocab = _word_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>", pad=pad, max_len=77)
            tok.save_pretrained(dest / tok_dir)
            config = CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab[pad],
            )  # fmt: skip
            CLIPTextModelWithProjection(config).save_pretrained(dest / enc_dir)
        tok, vocab = _word_tokenizer(bos=None, eos="</s>", pad="<pad>", max_len=512)
        tok.save_pretrained(dest / "tokenizer_3")
        t5 = T5Config(
            vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
            pad_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"],
        )  # fmt: skip
        T5EncoderModel(t5).save_pretrained(dest / "text_encoder_3")
        AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8,
            scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False, use_post_quant_conv=False,
        ).save_pretrained(dest / "vae")  # fmt: skip
        SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
            pos_embed_max_size=16,
        ).save_pretrained(dest / "transformer")  # fmt: skip
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(dest / "scheduler")
    (dest / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return dest


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def test_sd3_text_encoders_combine_like_sd3(tiny_sd3, tmp_path):
    enc = SD3TextEncoder(tiny_sd3, t5_max_length=20)
    assert (enc.hidden_dim, enc.pooled_dim, enc.seq_len) == (32, 24, 77 + 20)
    texts = ["", "the red disc on the left", "unknown words here"]
    hidden, pooled = enc.encode(texts)
    assert hidden.shape == (3, 97, 32) and pooled.shape == (3, 24)

    # by hand: penultimate CLIP states side by side, zero-padded to T5's width, then T5's states
    def clip(tok, model):
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    h1, p1 = clip(enc.tokenizer_1, enc.clip_1)
    h2, p2 = clip(enc.tokenizer_2, enc.clip_2)
    torch.testing.assert_close(hidden[:, :77, :8], h1)
    torch.testing.assert_close(hidden[:, :77, 8:24], h2)
    assert torch.equal(hidden[:, :77, 24:], torch.zeros(3, 77, 8))
    ids = enc.tokenizer_3(
        texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        torch.testing.assert_close(hidden[:, 77:], enc.t5(ids).last_hidden_state)
    torch.testing.assert_close(pooled, torch.cat([p1, p2], -1))
    # the pooled CLIP output is read at the end token: different texts, different vectors
    assert not torch.allclose(pooled[0], pooled[1])

    # without T5 (dropped to save memory) its part is zeros
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(tiny_sd3, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    enc2 = load_text_encoder(no_t5, {"class": "sd3", "t5_max_length": 20, "t5_width": 32})
    h, p = enc2.encode(texts)
    torch.testing.assert_close(h[:, :77], hidden[:, :77])
    assert torch.equal(h[:, 77:], torch.zeros(3, 20, 32))
    torch.testing.assert_close(p, pooled)


def test_sd3_medium_builder_from_a_registry_checkpoint(registry, tiny_sd3, tmp_path):
    ref = registry.create(
        "weights", "tiny-sd3", tiny_sd3, license="Apache-2.0 (random init)", source="tests", progress=False
    ).ref
    cache = tmp_path / "cache"
    bundle = build_reflayer(
        "sd3-medium", weights="weights/tiny-sd3@latest", registry=registry, cache_dir=cache, resolution=R
    )
    assert bundle.config["base_weights"] == ref and bundle.config["sources"]["base_weights"] == ref
    assert bundle.scheduler.config.shift == 3.0 and bundle.vae_scale_factor == 8
    assert isinstance(bundle.text_encoder, SD3TextEncoder)
    assert bundle.text_encoder.seq_len == 77 + 256
    # the transformer is the checkpoint's, the alpha decoder starts from the checkpoint's VAE decoder
    pretrained = SD3Transformer2DModel.from_pretrained(str(tiny_sd3), subfolder="transformer")
    for k, v in pretrained.state_dict().items():
        assert torch.equal(bundle.model.transformer.state_dict()[k], v), k
    assert bundle.vae.config.shift_factor == 0.06

    _, images, layers, prompts, texts = scenes_batch(2)
    latents = encode_batch(bundle, images, layers, canvas_batch(prompts, R, R), texts)
    assert latents["target"].shape == (2, 16, 8, 8) and latents["text_hidden"].shape == (2, 333, 32)
    loss = flow_matching_loss(bundle, latents, torch.Generator().manual_seed(0))
    loss.backward()
    assert bundle.model.compress.weight.grad is not None
    bundle.model.zero_grad(set_to_none=True)

    image, prompt = _image(), {"type": "text+point", "points": [[20, 30, 1]], "text": "the green square"}
    out = RefLayerPipeline(bundle)(image, prompt, num_inference_steps=2, guidance_scale=2.0, seed=3)
    assert out.shape == (90, 70, 4) and out.dtype == np.uint8

    # saved by reference: the base checkpoint's VAE and text encoders are not copied
    folder = bundle.save(tmp_path / "model")
    files = _files(folder)
    assert not any(f.startswith(("vae/", "text_encoder")) for f in files), files
    doc = json.loads((folder / "bundle.json").read_text())
    assert doc["base_weights"] == ref and doc["components"]["vae"] == {"ref": ref, "subfolder": "vae"}
    loaded = RefLayerBundle.load(folder, registry=registry, cache_dir=cache)
    assert_same_bundle(bundle, loaded)
    again = RefLayerPipeline(loaded)(image, prompt, num_inference_steps=2, guidance_scale=2.0, seed=3)
    assert_pixels_close(out, again)
    assert isinstance(loaded.model, RefLayer)

    with pytest.raises(ValueError, match="cannot be overridden"):
        build_reflayer(
            "sd3-medium", weights=ref, registry=registry, cache_dir=cache, resolution=R, num_layers=1
        )
    with pytest.raises(ValueError, match="token grid"):
        build_reflayer("sd3-medium", weights=ref, registry=registry, cache_dir=cache, resolution=512)
