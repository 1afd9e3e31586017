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

Its frozen parts and the saved model folder: :mod:`reflade.train.bundle`; presets and builders:
:mod:`reflade.train.model`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["PHASES", "PREDICTIONS", "SIGMA_EPS", "RefLayer"]

PREDICTIONS = ("velocity", "sample")
"""What the transformer may output: the flow-matching velocity ``noise - x0`` (SD3's), or the clean latent."""
SIGMA_EPS = 1e-3
"""Smallest noise level a ``sample`` prediction is divided by (the sampler's last level with 1000 train steps)."""
PHASES = ("transformer", "alpha")
"""Training phases: the transformer (with ``compress`` and the text projections) on the flow-matching loss, and
the alpha decoder on alpha targets."""


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
