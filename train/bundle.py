"""A RefLayer model with its frozen parts (:class:`RefLayerBundle`): the trainable
:class:`~reflade.train.reflayer.RefLayer` beside the VAE (``AutoencoderKL``), the text encoder
(:mod:`reflade.train.text`) and the sampler (``FlowMatchEulerDiscreteScheduler``); the frozen encoders alone
(:class:`FrozenEncoders`, what a latent-caching pass needs); a model folder saved and loaded.

Latents: ``(vae.encode(x).mode() - shift_factor) * scaling_factor``, the SD3 convention (``shift_factor`` 0 when
the VAE has none). The RGB target is the layer composited over mid-grey, i.e. premultiplied alpha in the VAE's
[-1, 1] space (``rgb * a`` there): empty pixels are the VAE's neutral 0, the VAE sees an ordinary image, and the
straight colour comes back exactly by dividing by the alpha the alpha decoder predicts.

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

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from torch import nn

from reflade.train.canvas import empty_canvas
from reflade.train.reflayer import RefLayer
from reflade.train.text import TextEncoder, load_text_encoder

__all__ = ["BUNDLE_FILE", "FORMAT", "FORMAT_VERSION", "FrozenEncoders", "RefLayerBundle"]

FORMAT = "reflade.reflayer"
FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
"""The file that makes a folder (and a registry version) a RefLayer model bundle."""
_BUNDLE = BUNDLE_FILE
_LOW_CPU_MEM = importlib.util.find_spec("accelerate") is not None
"""diffusers loads without first initialising random weights only with accelerate; say so, don't warn."""


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
