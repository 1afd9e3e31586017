"""Layer completion (stage 3) with an SD3-family latent inpainting model: the ``neural`` family's completion when
``engine.completion_model`` is ``sd3-inpaint`` (the default stays ``repaint``, :mod:`.neural_completion`).

The checkpoint is a diffusers ``StableDiffusion3InpaintPipeline`` folder (``model_index.json``, ``transformer/``,
``vae/``, ``scheduler/``, and for a real SD3 the CLIP-L/G and T5 text encoders with their tokenizers), imported once
with ``reflade registry import`` and loaded here by registry reference (``engine.sd3_weights``) from the local
weights cache, ``local_files_only``, safetensors: no hub access at run time. ``tiny_weights`` registers a random
tiny one without text encoders (``weights/tiny-sd3-inpaint``) for tests and CPU runs.

Conditioning: every hole is completed under SD3's empty prompt, without classifier-free guidance (the hole's
surroundings are the condition; the engine has no caption of what lies behind an entity). The checkpoint's text
encoders encode the empty prompt ONCE when the backend loads and are then dropped (T5 alone is 4.7 B parameters);
a checkpoint without text encoders (the tiny one) is conditioned on zero embeddings of the transformer's widths.

Holes, crops, sampling sides and seeds follow :class:`.neural_completion.NeuralCompletionBackend` exactly (this
class inherits them and overrides only :meth:`sample`): each hole's square crop is resized to its sampling side
(:func:`.neural_completion.sampling_side`, at most the transformer's ``sample_size`` times the VAE factor, a
multiple of VAE factor x patch size); holes of all images of
a :meth:`complete_batch` call that share a side go through the pipeline together; each hole has its own generator
(seeded from the image's sha256, entity id, hole kind and ``completion_seed``), so a hole's result does not depend
on its batch beyond floating-point noise. The mask handed to the pipeline covers every latent cell that any
unknown pixel touches (the pipeline downsamples masks by nearest neighbour, which could keep a cell of hole pixels
as "known" and copy the entity back into its own background). The result is pasted ONLY inside the hole.

Device: CUDA when ``num_gpus > 0`` and a GPU is visible, else the CPU; dtype ``completion_dtype`` (``auto``:
bfloat16 on CUDA, float32 on the CPU). The VAE decodes one image at a time (``enable_slicing``) to bound memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reflade.engine.backends.neural_completion import Hole, NeuralCompletionBackend
from reflade.engine.backends.neural_models import WeightsSource, cfg_value, resize, select_device
from reflade.engine.config import EngineConfig

if TYPE_CHECKING:
    from reflade.platform.registry import Registry

__all__ = [
    "DEFAULT_SD3_WEIGHTS",
    "DTYPES",
    "SD3InpaintCompletionBackend",
    "load_sd3_inpaint",
    "resolve_dtype",
]

DEFAULT_SD3_WEIGHTS = "weights/tiny-sd3-inpaint@latest"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Values of ``engine.completion_dtype`` besides ``auto``."""
TEXT_COMPONENTS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)
"""The SD3 pipeline's text encoders and tokenizers (a checkpoint may leave them out)."""
_NULL_TOKENS = 77
"""Length of the zero prompt embeddings of a checkpoint without text encoders (CLIP's context length)."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``engine.completion_dtype`` as a torch dtype: ``auto`` is bfloat16 on CUDA and float32 elsewhere.

    Raises:
        ValueError: an unknown name.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown engine.completion_dtype {name!r} (known: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def load_sd3_inpaint(
    folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Load an SD3 inpainting checkpoint folder offline and encode the empty prompt.

    Args:
        folder: a ``StableDiffusion3InpaintPipeline`` (or ``StableDiffusion3Pipeline``) ``save_pretrained`` folder.
        device, dtype: where and in which dtype the networks run.

    Returns:
        (pipeline without text encoders, prompt embeddings 1xLxD, pooled embeddings 1xP), on ``device``.

    Raises:
        ValueError: the folder is not an SD3-family diffusers checkpoint.
    """
    from diffusers import StableDiffusion3InpaintPipeline

    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    cls = str(index.get("_class_name", ""))
    if not cls.startswith("StableDiffusion3") or not (folder / "transformer").is_dir():
        raise ValueError(
            f"{folder} is not an SD3-family diffusers checkpoint (model_index.json names {cls or 'nothing'!r}; "
            f"expected a StableDiffusion3 pipeline with transformer/, vae/ and scheduler/)"
        )
    # Text components the folder lacks (null in model_index.json, or no subfolder) are passed as None.
    absent = {
        name: None
        for name in TEXT_COMPONENTS
        if not (isinstance(index.get(name), list) and index[name][0] and (folder / name).is_dir())
    }
    pipe = StableDiffusion3InpaintPipeline.from_pretrained(
        folder, local_files_only=True, dtype=dtype, low_cpu_mem_usage=False, **absent
    )
    pipe = pipe.to(device)
    for module in (pipe.transformer, pipe.vae):
        # from_pretrained's dtype leaves the transformer in float32 (diffusers 0.42.1, without accelerate)
        if module.dtype != dtype:
            module.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    tcfg = pipe.transformer.config
    if pipe.text_encoder is not None and pipe.text_encoder_2 is not None:
        with torch.inference_mode():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt="", prompt_2="", prompt_3="", device=device, do_classifier_free_guidance=False
            )
        pipe.register_modules(**dict.fromkeys(TEXT_COMPONENTS))  # used once: free their memory
    else:
        embeds = torch.zeros((1, _NULL_TOKENS, tcfg.joint_attention_dim), device=device, dtype=dtype)
        pooled = torch.zeros((1, tcfg.pooled_projection_dim), device=device, dtype=dtype)
    return pipe, embeds.to(device, dtype), pooled.to(device, dtype)


class SD3InpaintCompletionBackend(NeuralCompletionBackend):
    """Stage 3 with SD3-family latent inpainting (``StableDiffusion3InpaintPipeline``); see the module docstring.

    Same interface as :class:`.neural_completion.NeuralCompletionBackend`: :meth:`complete` for one image,
    :meth:`complete_batch` for several (holes batched by sampling side).

    Args:
        cfg: engine configuration (``sd3_weights``, ``completion_dtype``, ``completion_steps``,
            ``completion_dilate_px``, ``completion_seed``, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment),
            unless ``engine.weights_dir`` names a local folder of weights (:class:`.neural_models.WeightsSource`).
        cache_dir: local weights cache; None means :func:`.neural_models.default_cache_dir`.

    Attributes:
        weights: exact references of the weights loaded, [completion].
        size: the largest sampling side, pixels (the transformer's ``sample_size`` x the VAE factor).
        side_multiple: what every sampling side is a multiple of (VAE factor x patch size), pixels.
        vae_factor: image pixels per latent pixel.

    Raises:
        RegistryError: ``sd3_weights`` cannot be fetched (says how to register the tiny weights).
        ValueError: the weights are not an SD3 checkpoint, or an unknown ``completion_dtype``.
    """

    name = "sd3-inpaint"

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        # Not NeuralCompletionBackend.__init__: that one loads the RePaint UNet.
        self.cfg = cfg or EngineConfig(completion_model="sd3-inpaint")
        self.device = select_device(self.cfg)
        self.dtype = resolve_dtype(str(cfg_value(self.cfg, "completion_dtype", "auto")), self.device)
        ref = cfg_value(self.cfg, "sd3_weights", DEFAULT_SD3_WEIGHTS)
        local = WeightsSource(self.cfg, registry, cache_dir).fetch(ref, "completion")
        self.weights = [local.ref]
        self.pipe, self.prompt_embeds, self.pooled_embeds = load_sd3_inpaint(
            local.path, self.device, self.dtype
        )
        self.vae_factor = int(self.pipe.vae_scale_factor)
        tcfg = self.pipe.transformer.config
        self._set_sides(int(tcfg.sample_size) * self.vae_factor, self.vae_factor * int(tcfg.patch_size))

    def _latent_cells(self, unknown: np.ndarray) -> np.ndarray:
        """SxS bool -> SxS float32 mask, 1 on every latent cell (``vae_factor`` pixels square) holding an unknown
        pixel."""
        f, s = self.vae_factor, unknown.shape[0]
        cells = unknown.reshape(s // f, f, s // f, f).any(axis=(1, 3))
        return np.repeat(np.repeat(cells, f, axis=0), f, axis=1).astype(np.float32)

    def sample(self, images: list[np.ndarray], holes: list[Hole], side: int) -> None:
        """Inpaint a batch of holes at ``side`` x ``side`` pixels; sets each hole's ``result`` (arguments as
        :meth:`.neural_completion.NeuralCompletionBackend.sample`)."""
        s, n = side, len(holes)
        pixels, masks = [], []
        for image, hole in zip(images, holes, strict=True):
            x0, y0, x1, y1 = hole.crop
            pixels.append(resize(image[y0:y1, x0:x1], (s, s)).astype(np.float32) / 255.0)
            # any trace of the hole in a small pixel makes it unknown: the model must not copy hole pixels
            unknown = resize(hole.unknown[y0:y1, x0:x1].astype(np.float32), (s, s)) > 0
            masks.append(self._latent_cells(unknown)[..., None])
        generators = [torch.Generator("cpu").manual_seed(h.seed) for h in holes]
        with torch.inference_mode():
            out = self.pipe(
                prompt_embeds=self.prompt_embeds.expand(n, -1, -1),
                pooled_prompt_embeds=self.pooled_embeds.expand(n, -1),
                image=np.stack(pixels),
                mask_image=np.stack(masks),
                height=s,
                width=s,
                strength=1.0,
                num_inference_steps=self.steps,
                guidance_scale=1.0,  # no classifier-free guidance: the prompt is empty
                generator=generators,
                output_type="np",
            ).images
        result = np.clip(np.round(np.asarray(out, np.float32) * 255.0), 0, 255).astype(np.uint8)
        for hole, sample in zip(holes, result, strict=True):
            x0, y0, x1, y1 = hole.crop
            hole.result = resize(sample, (x1 - x0, y1 - y0))
