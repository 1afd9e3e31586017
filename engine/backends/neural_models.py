"""The ``neural`` family's models: their configured weights, where the weights come from, the device they run on,
the loaders, and the image preprocessing shared by the scene, captioner and completion backends.

Weights come from the registry by reference (``EngineConfig.sam_weights``, ``detector_weights``,
``captioner_weights``, ``completion_weights`` / ``sd3_weights``), are downloaded once per machine into a cache
folder keyed by the exact version and its content hash, and load without pickles: SAM from ``config.json`` +
``model.safetensors``, OWLv2, BLIP and the UNet with ``from_pretrained(..., local_files_only=True)``
(safetensors). On a machine without an object store (the GPU check), ``engine.weights_dir`` names a local folder
of weights folders instead (:class:`WeightsSource`). ``tiny_weights`` builds random tiny versions of every model
for tests and CPU runs, ``real_size_weights`` random ones of the real models' sizes.

Device: CUDA when ``EngineConfig.num_gpus > 0`` and a GPU is visible, else the CPU. On CUDA the networks run
under bf16 autocast (:func:`autocast`); every call runs under ``torch.inference_mode()``.

Nothing here imports the registry (and boto3 with it) at module level: the backends import on a machine without
boto3 and load from ``engine.weights_dir`` there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from reflade.engine.config import EngineConfig
from reflade.platform.weights import LocalWeights, fetch_weights
from reflade.platform.weights import default_cache_dir as platform_cache_dir

if TYPE_CHECKING:
    from reflade.platform.registry import Registry

__all__ = [
    "DEFAULT_CAPTIONER_WEIGHTS",
    "DEFAULT_COMPLETION_WEIGHTS",
    "DEFAULT_DETECTOR_WEIGHTS",
    "DEFAULT_SAM_WEIGHTS",
    "DEFAULT_VOCABULARY",
    "BlipParts",
    "Owlv2Parts",
    "WeightsSource",
    "autocast",
    "build_sam",
    "captioner_ref",
    "cfg_value",
    "check_image",
    "default_cache_dir",
    "load_blip",
    "load_owlv2",
    "load_repaint",
    "load_sam",
    "resize",
    "round_up",
    "select_device",
    "weights_refs",
]

DEFAULT_SAM_WEIGHTS = "weights/tiny-sam@latest"
DEFAULT_DETECTOR_WEIGHTS = "weights/tiny-owlv2@latest"
DEFAULT_COMPLETION_WEIGHTS = "weights/tiny-repaint@latest"
DEFAULT_CAPTIONER_WEIGHTS = "weights/tiny-blip@latest"
DEFAULT_CAPTION_MAX_NEW_TOKENS = 16
DEFAULT_VOCABULARY = (
    "person", "cat", "dog", "car", "bicycle", "chair", "table", "bottle", "cup", "book", "plant", "ball",
)  # fmt: skip
DEFAULT_DETECTOR_THRESHOLD = 0.1
DEFAULT_DETECTOR_FALLBACK = True
DEFAULT_COMPLETION_STEPS = 4
DEFAULT_COMPLETION_DILATE_PX = 4
DEFAULT_COMPLETION_SEED = 0


# ---------------------------------------------------------------- configuration


def cfg_value(cfg: Any, name: str, default: Any) -> Any:
    """``cfg.name``, or ``default`` for a configuration object without that field."""
    return getattr(cfg, name, default)


def captioner_ref(cfg: EngineConfig) -> str:
    """The captioner's registry reference, ``""`` when no captioner is configured."""
    return str(cfg_value(cfg, "captioner_weights", DEFAULT_CAPTIONER_WEIGHTS) or "").strip()


def weights_refs(cfg: EngineConfig) -> list[str]:
    """The configured registry references of the neural backends' weights: [sam, detector, completion,
    captioner], without the captioner when ``captioner_weights`` is empty; completion is ``sd3_weights`` when
    ``completion_model`` is ``sd3-inpaint``, else ``completion_weights``.

    Raises:
        ValueError: an unknown ``completion_model``."""
    model = cfg_value(cfg, "completion_model", "repaint")
    if model == "sd3-inpaint":  # engine/backends/sd3_inpaint.py
        completion = cfg_value(cfg, "sd3_weights", "weights/tiny-sd3-inpaint@latest")
    elif model != "repaint":  # said when the run is planned, not later inside a Ray actor
        raise ValueError(f"unknown engine.completion_model {model!r} (known: repaint, sd3-inpaint)")
    else:
        completion = cfg_value(cfg, "completion_weights", DEFAULT_COMPLETION_WEIGHTS)
    refs = [
        cfg_value(cfg, "sam_weights", DEFAULT_SAM_WEIGHTS),
        cfg_value(cfg, "detector_weights", DEFAULT_DETECTOR_WEIGHTS),
        completion,
    ]
    captioner = captioner_ref(cfg)
    return refs + [captioner] if captioner else refs


def select_device(cfg: EngineConfig) -> torch.device:
    """CUDA when the stage was given GPUs (``num_gpus > 0``) and one is visible, else the CPU."""
    return torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- weights: where they come from


def default_cache_dir(cfg: EngineConfig | None = None) -> Path:
    """Where downloaded weights are kept: ``engine.weights_cache``, else the platform's default
    (:func:`reflade.platform.weights.default_cache_dir`)."""
    return platform_cache_dir(cfg_value(cfg, "weights_cache", "") if cfg is not None else None)


class WeightsSource:
    """Where the neural backends' weights come from: the registry, each version downloaded once into the local
    cache (:func:`reflade.platform.weights.fetch_weights`), or, when ``engine.weights_dir`` is set, folders on
    local disk named like the references' names (``DIR/sam-vit-h`` for ``weights/sam-vit-h@...``), with no
    registry and no object store (a GPU machine has neither).

    Args:
        cfg: engine configuration (``weights_dir``, ``weights_cache``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment)
            when the first weights are fetched, never with ``weights_dir`` set.
        cache_dir: local weights cache; None means :func:`default_cache_dir`.
    """

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.folder = str(cfg_value(cfg, "weights_dir", "") or "").strip()
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir(cfg)
        self._registry = registry

    @property
    def registry(self) -> Registry:
        """The registry (built on first use; credentials from the worker's own environment, design.md)."""
        if self._registry is None:
            from reflade.platform.config import load_config
            from reflade.platform.registry import Registry

            self._registry = Registry.from_config(load_config())
        return self._registry

    def fetch(self, ref: str, what: str) -> LocalWeights:
        """The local folder of ``ref`` (downloaded and verified once, or found in ``weights_dir``).

        Args:
            ref: a registry reference, ``weights/NAME[@VERSION]``.
            what: the model's name for error messages (``SAM``, ``detector``, ...).

        Returns:
            Its :class:`~reflade.platform.weights.LocalWeights`; from ``weights_dir`` the reference is
            ``weights/NAME@local``.

        Raises:
            ValueError: ``weights_dir`` is set and holds no folder of that name.
            IntegrityError: the registry's files fail verification.
            RegistryError: the reference cannot be resolved (says how to register the tiny weights).
        """
        if self.folder:
            return self._from_folder(ref, what)
        from reflade.platform.registry import IntegrityError, RegistryError

        try:
            return fetch_weights(self.registry, ref, self.cache_dir)
        except IntegrityError as e:
            raise IntegrityError(
                f"{what} weights {ref!r} failed verification, refusing to load them: {e}. Re-import the weights "
                f"(reflade registry import) or point the engine configuration at another version."
            ) from e
        except RegistryError as e:
            raise RegistryError(
                f"{what} weights {ref!r} cannot be fetched: {e}. Tiny random weights for tests and CPU runs are "
                f"registered with `reflade engine tiny-weights`."
            ) from e

    def _from_folder(self, ref: str, what: str) -> LocalWeights:
        kind, _, rest = str(ref).partition("/")
        name = rest.split("@", 1)[0].split(":", 1)[0]
        root = Path(self.folder).expanduser()
        path = root / name
        if not kind or not name or name in (".", "..") or "/" in name or not path.is_dir():
            held = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise ValueError(
                f"{what} weights {ref!r}: engine.weights_dir {str(root)!r} has no folder {name!r} "
                f"(it holds: {', '.join(held) or 'nothing'})"
            )
        return LocalWeights(f"{kind}/{name}@local", path, False)


# ---------------------------------------------------------------- weights: loading


def build_sam(config: dict[str, Any]):
    """A ``segment_anything.modeling.Sam`` from the plain-JSON constructor arguments in a SAM ``config.json``.

    Keys: ``image_size``, ``patch_size``, ``encoder_embed_dim``, ``encoder_depth``, ``encoder_num_heads``,
    ``encoder_mlp_ratio``, ``encoder_global_attn_indexes``, ``encoder_window_size``, ``prompt_embed_dim``,
    ``mask_in_chans``, ``decoder_depth``, ``decoder_mlp_dim``, ``decoder_num_heads``, ``num_multimask_outputs``,
    ``iou_head_depth``, ``iou_head_hidden_dim``, ``pixel_mean``, ``pixel_std``. SAM ViT-B is 1024/16, 768 wide,
    depth 12, 12 heads, global blocks [2, 5, 8, 11], window 14, prompt 256, decoder depth 2, MLP 2048, 8 heads.

    Raises:
        ValueError: a missing key.
    """
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    try:
        size, patch, dim = config["image_size"], config["patch_size"], config["prompt_embed_dim"]
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=size,
                patch_size=patch,
                embed_dim=config["encoder_embed_dim"],
                depth=config["encoder_depth"],
                num_heads=config["encoder_num_heads"],
                mlp_ratio=config["encoder_mlp_ratio"],
                out_chans=dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=config["encoder_window_size"],
                global_attn_indexes=tuple(config["encoder_global_attn_indexes"]),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(size // patch, size // patch),
                input_image_size=(size, size),
                mask_in_chans=config["mask_in_chans"],
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=config["num_multimask_outputs"],
                transformer=TwoWayTransformer(
                    depth=config["decoder_depth"],
                    embedding_dim=dim,
                    mlp_dim=config["decoder_mlp_dim"],
                    num_heads=config["decoder_num_heads"],
                ),
                transformer_dim=dim,
                iou_head_depth=config["iou_head_depth"],
                iou_head_hidden_dim=config["iou_head_hidden_dim"],
            ),
            pixel_mean=list(config["pixel_mean"]),
            pixel_std=list(config["pixel_std"]),
        )
    except KeyError as e:
        raise ValueError(f"SAM config.json lacks {e.args[0]!r} (see build_sam for the keys)") from None
    return sam.eval()


def load_sam(folder: str | os.PathLike, device: torch.device | str = "cpu"):
    """SAM from ``config.json`` + ``model.safetensors`` (never a pickle).

    Raises:
        ValueError: missing file, or the weights do not fit the config.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a SAM weights folder: {name} is missing")
    sam = build_sam(json.loads((folder / "config.json").read_text()))
    try:
        sam.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}/model.safetensors does not fit its config.json: {e}") from None
    return sam.to(device).eval()


@dataclass
class Owlv2Parts:
    """An OWLv2 detector with its tokenizer and preprocessing constants (what :func:`load_owlv2` returns)."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: np.ndarray
    std: np.ndarray


def load_owlv2(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Owlv2Parts:
    """OWLv2 detector, tokenizer and preprocessing constants from a ``save_pretrained`` folder, offline."""
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    folder = Path(folder)
    model = Owlv2ForObjectDetection.from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    size = model.config.vision_config.image_size
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # OpenAI CLIP
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    return Owlv2Parts(model, tokenizer, size, np.asarray(mean, np.float32), np.asarray(std, np.float32))


@dataclass
class BlipParts:
    """A BLIP captioner with its tokenizer and preprocessing constants (what :func:`load_blip` returns)."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: np.ndarray
    std: np.ndarray


def load_blip(folder: str | os.PathLike, device: torch.device | str = "cpu") -> BlipParts:
    """BLIP captioner (``BlipForConditionalGeneration``), tokenizer and preprocessing constants from a
    ``save_pretrained`` folder, offline, in float32 (the GPU runs it under bf16 autocast).

    Raises:
        ValueError: the folder has no ``config.json``.
    """
    from transformers import AutoTokenizer, BlipForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a BLIP captioner weights folder: config.json is missing")
    model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    model = model.float().to(device).eval()  # a half-precision checkpoint loads as float32 too
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    size = model.config.vision_config.image_size
    # BLIP's processor normalises with OpenAI CLIP's constants
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    return BlipParts(model, tokenizer, int(size), np.asarray(mean, np.float32), np.asarray(std, np.float32))


def load_repaint(folder: str | os.PathLike, device: torch.device | str = "cpu"):
    """(``UNet2DModel``, ``RePaintScheduler``) from a folder with ``unet/`` and ``scheduler/``, offline."""
    from diffusers import RePaintScheduler, UNet2DModel

    # low_cpu_mem_usage needs `accelerate`, which the platform does not install; say so instead of warning.
    unet = UNet2DModel.from_pretrained(
        folder, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False
    )
    unet = unet.to(device).eval()
    scheduler = RePaintScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return unet, scheduler


# ---------------------------------------------------------------- images


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is an HxWx3 uint8 RGB array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image, got {shape} {getattr(image, 'dtype', type(image))}"
        )


def resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area averaging down, bilinear up."""
    shrink = size[0] < a.shape[1] or size[1] < a.shape[0]
    return cv2.resize(a, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple)) * multiple
