"""The ``neural`` backends of stages 2 and 3: OWLv2 + SAM + a BLIP captioner for scene understanding, RePaint
for layer completion.

Weights come from the registry by reference (``EngineConfig.sam_weights``, ``detector_weights``,
``captioner_weights``, ``completion_weights``), are downloaded once per machine into a cache folder keyed by
the exact version and its content hash, and load without pickles: SAM from ``config.json`` +
``model.safetensors``, OWLv2, BLIP and the UNet with ``from_pretrained(..., local_files_only=True)``
(safetensors). ``tiny_weights`` builds random tiny versions of all four for tests and CPU runs.

Device: CUDA when ``EngineConfig.num_gpus > 0`` and a GPU is visible, else the CPU. On CUDA the networks run
under bf16 autocast; every call runs under ``torch.inference_mode()``.

Scene understanding (:class:`NeuralSceneBackend`):

1. OWLv2 scores every patch box against the text queries ``"a photo of a <word>"`` for each word of
   ``EngineConfig.vocabulary``; a box's score is its best query's sigmoid score and its label that query's word.
   The text embeddings are computed once, when the backend loads.
2. Boxes are clipped to the image, NMS'ed (IoU ``_NMS_IOU``) and kept above ``detector_threshold``. When none
   passes and ``detector_fallback`` is on, the best boxes are kept anyway (random tiny weights score every box
   alike; a real detector seldom needs it, and the post-filter judges what comes out). At most
   ``2 * max_entities`` boxes go on to SAM.
3. SAM: one image embedding per image, every box of the image through the prompt encoder and mask decoder at
   once (single-mask output), masks upscaled to the image and binarised at logit 0, then clipped to the box
   enlarged by ``_BOX_MARGIN`` of its size on each side (SAM's leaks past the detector's box are background).
4. Occlusion order by score: candidates are taken best score first. A candidate whose mask has IoU above
   ``merge_iou`` with an entity already kept is a duplicate and dropped. Pixels claimed by a better-scored entity
   stay with it (visible masks are disjoint), and the candidate lists that entity in ``occluded_by`` when it
   lost at least ``_MIN_OVERLAP`` of its mask (and ``_MIN_OVERLAP_PX`` pixels) to it: a box-prompted mask that
   spills over another object means that object sits in front of it inside the box. Visible masks outside the
   configured area fractions are dropped; at most ``max_entities`` are kept, ``entity_id`` 0..n-1 by score.
5. Attributes (colour word from HSV, position, size) follow the classical backend's rules, so both families
   describe entities in the same words for prompt generation.
6. Captions (:class:`NeuralCaptioner`, unless ``captioner_weights`` is empty): every kept entity's box,
   grown by ``_CAPTION_MARGIN`` of its size on each side and clipped to the image, is cropped, resized to the
   captioner's square input and captioned by a BLIP captioning model (``BlipForConditionalGeneration``), greedy, at most
   ``caption_max_new_tokens`` tokens; the crops of all entities of all images of a batch go through the model
   together (``_CAPTION_BATCH`` at a time). The decoded text (special tokens skipped) is stored in
   ``Entity.caption``; prompt generation sanitises it into the fine text prompts
   (:func:`reflade.engine.stages.prompts.sanitize_caption`).

Layer completion (:class:`NeuralCompletionBackend`), per entity, with RePaint (:cite:`lugmayr2022repaint`):

- background: the entity's mask dilated by ``completion_dilate_px`` is the hole; everything else is known.
- amodal layer: the occluded part is ``hull(visible) & (union of the occluders' masks) & ~visible``; it is the
  hole, and the occluders' pixels are unknown too (what lies behind them is the entity or the background, not
  the occluder). Entities without ``occluded_by`` have no hole: their layer is their visible pixels.

Each hole is sampled in a square crop around it (``_CONTEXT`` times the hole's size, at least ``_MIN_CROP_PX``),
resized to its sampling side (:func:`sampling_side`): the crop's side rounded up to a bucket step, at least a
minimum side, at most the UNet's ``sample_size`` (step and minimum are ``_BUCKET_FRACTION`` and
``_MIN_SIDE_FRACTION`` of ``sample_size``, rounded up to :func:`unet_side_multiple`). A small crop is thus sampled
near its own scale instead of being upsampled to ``sample_size`` (more pixels to denoise, no more detail); a crop
larger than ``sample_size`` is downsampled to it. The result is resized back and pasted ONLY inside the hole, so
every other pixel equals the image exactly. Holes of all entities (of all images in :meth:`complete_batch`) with
the same sampling side go through the sampler together. Each hole draws its noise from its own generator, seeded
from the image's sha256, the entity id, the hole kind and ``completion_seed``: results do not depend on how images
are batched.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from reflade.engine.types import Completion, Entity, mask_box
from reflade.platform.weights import LocalWeights, fetch_weights
from reflade.platform.weights import default_cache_dir as platform_cache_dir

if TYPE_CHECKING:  # the registry (and boto3 with it) is imported where weights are fetched, so that the model
    # builders here import on a machine without boto3 (bench/gpu_engine.py on the GPU machine)
    from reflade.platform.registry import Registry

__all__ = [
    "DEFAULT_CAPTIONER_WEIGHTS",
    "DEFAULT_COMPLETION_WEIGHTS",
    "DEFAULT_DETECTOR_WEIGHTS",
    "DEFAULT_SAM_WEIGHTS",
    "DEFAULT_VOCABULARY",
    "NeuralCaptioner",
    "NeuralCompletionBackend",
    "NeuralSceneBackend",
    "build_sam",
    "default_cache_dir",
    "load_blip",
    "load_owlv2",
    "load_repaint",
    "load_sam",
    "sampling_side",
    "select_device",
    "unet_side_multiple",
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

SOURCE = "owlv2+sam"
_QUERY_TEMPLATE = "a photo of a {}"
"""OWL-ViT's prompt for a category word."""
_NMS_IOU = 0.5
"""Detector boxes overlapping a better one by more than this IoU are dropped."""
_BOX_MARGIN = 0.1
"""SAM masks are clipped to the detector box grown by this fraction of its width/height on each side."""
_MIN_OVERLAP = 0.02
"""Fraction of a candidate's mask taken by a better entity that makes that entity an occluder."""
_MIN_OVERLAP_PX = 6
_MIN_BOX_PX = 2
"""Boxes narrower or lower than this after clipping to the image are dropped (pixels)."""
_CONTEXT = 2.0
"""A completion crop is this many times the hole's larger side."""
_MIN_CROP_PX = 32
_BUCKET_FRACTION = 0.25
"""Sampling sides are multiples of this fraction of the UNet's sample_size (rounded up to its side multiple)."""
_MIN_SIDE_FRACTION = 0.5
"""Crops are sampled at least at this fraction of the UNet's sample_size (rounded up to the bucket step)."""
_SAMPLER_BATCH = 32
"""Holes per UNet batch."""
_JUMP_LENGTH = 10
_JUMP_N_SAMPLE = 1
"""RePaint resampling (jump length, samples per jump); 1 sample means no resampling, the cheapest schedule."""
_CAPTION_MARGIN = 0.15
"""A caption crop is the entity's box grown by this fraction of its width/height on each side (context)."""
_CAPTION_BATCH = 32
"""Crops per captioner batch."""
_CAPTION_MAX_CHARS = 300
"""Decoded captions are cut to this many characters (the schema's text limit) before they travel on."""


# ---------------------------------------------------------------- configuration


def _cfg(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg, name, default)


def _captioner_ref(cfg: EngineConfig) -> str:
    return str(_cfg(cfg, "captioner_weights", DEFAULT_CAPTIONER_WEIGHTS) or "").strip()


def weights_refs(cfg: EngineConfig) -> list[str]:
    """The configured registry references of the neural backends' weights: [sam, detector, completion,
    captioner], without the captioner when ``captioner_weights`` is empty; completion is ``sd3_weights`` when
    ``completion_model`` is ``sd3-inpaint``, else ``completion_weights``.

    Raises:
        ValueError: an unknown ``completion_model``."""
    model = _cfg(cfg, "completion_model", "repaint")
    if model == "sd3-inpaint":  # engine/backends/sd3_inpaint.py
        completion = _cfg(cfg, "sd3_weights", "weights/tiny-sd3-inpaint@latest")
    elif model != "repaint":  # said when the run is planned, not later inside a Ray actor
        raise ValueError(f"unknown engine.completion_model {model!r} (known: repaint, sd3-inpaint)")
    else:
        completion = _cfg(cfg, "completion_weights", DEFAULT_COMPLETION_WEIGHTS)
    refs = [
        _cfg(cfg, "sam_weights", DEFAULT_SAM_WEIGHTS),
        _cfg(cfg, "detector_weights", DEFAULT_DETECTOR_WEIGHTS),
        completion,
    ]
    captioner = _captioner_ref(cfg)
    return refs + [captioner] if captioner else refs


def _vocabulary(cfg: EngineConfig) -> list[str]:
    words = [str(w).strip() for w in _cfg(cfg, "vocabulary", DEFAULT_VOCABULARY) if str(w).strip()]
    if not words:
        raise ValueError(
            "engine.vocabulary is empty: the open-vocabulary detector needs at least one category"
        )
    return words


def select_device(cfg: EngineConfig) -> torch.device:
    """CUDA when the stage was given GPUs (``num_gpus > 0``) and one is visible, else the CPU."""
    return torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- weights: fetch and cache


def default_cache_dir(cfg: EngineConfig | None = None) -> Path:
    """Where downloaded weights are kept: ``engine.weights_cache``, else the platform's default
    (:func:`reflade.platform.weights.default_cache_dir`)."""
    return platform_cache_dir(_cfg(cfg, "weights_cache", "") if cfg is not None else None)


def _fetch(registry: Registry, ref: str, cache_dir, what: str) -> LocalWeights:
    from reflade.platform.registry import IntegrityError, RegistryError

    try:
        return fetch_weights(registry, ref, cache_dir)
    except IntegrityError as e:
        raise IntegrityError(
            f"{what} weights {ref!r} failed verification, refusing to load them: {e}. Re-import the weights "
            f"(reflade registry import) or point the engine configuration at another version."
        ) from e
    except RegistryError as e:
        raise RegistryError(
            f"{what} weights {ref!r} cannot be fetched: {e}. Tiny random weights for tests and CPU runs are "
            f"registered with `python -m reflade.engine.backends.tiny_weights`."
        ) from e


def _registry(registry: Registry | None) -> Registry:
    if registry is not None:
        return registry
    from reflade.platform.config import load_config
    from reflade.platform.registry import Registry

    # Credentials come from the worker's own environment (design.md), never from a runtime_env.
    return Registry.from_config(load_config())


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
class _Owl:
    model: Any
    tokenizer: Any
    image_size: int
    mean: np.ndarray
    std: np.ndarray


def load_owlv2(folder: str | os.PathLike, device: torch.device | str = "cpu") -> _Owl:
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
    return _Owl(model, tokenizer, size, np.asarray(mean, np.float32), np.asarray(std, np.float32))


@dataclass
class _Blip:
    model: Any
    tokenizer: Any
    image_size: int
    mean: np.ndarray
    std: np.ndarray


def load_blip(folder: str | os.PathLike, device: torch.device | str = "cpu") -> _Blip:
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
    return _Blip(model, tokenizer, int(size), np.asarray(mean, np.float32), np.asarray(std, np.float32))


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


# ---------------------------------------------------------------- mask helpers


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image, got {shape} {getattr(image, 'dtype', type(image))}"
        )


def _hull(mask: np.ndarray) -> np.ndarray:
    pts = cv2.findNonZero(mask.astype(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    if pts is not None:
        cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    return out.astype(bool)


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area averaging down, bilinear up."""
    shrink = size[0] < a.shape[1] or size[1] < a.shape[0]
    return cv2.resize(a, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple)) * multiple


def unet_side_multiple(block_out_channels: list[int] | tuple[int, ...], vae_factor: int = 1) -> int:
    """Pixels an input side of a diffusers UNet must be a multiple of.

    Every down block but the last halves the resolution (``UNet2DModel``, ``UNet2DConditionModel``, and the
    ``AutoencoderKL`` encoder alike), so a side must be a multiple of ``2 ** (len(block_out_channels) - 1)``
    latent pixels, times the VAE's factor in image pixels (1 for a pixel-space UNet).

    Args:
        block_out_channels: the model config's ``block_out_channels`` (one entry per level).
        vae_factor: image pixels per latent pixel (8 for the SD VAEs, 1 without a VAE).

    Raises:
        ValueError: no levels, or a factor below 1.
    """
    if len(block_out_channels) < 1 or vae_factor < 1:
        raise ValueError(
            f"need at least one level and a VAE factor >= 1, got {block_out_channels}, {vae_factor}"
        )
    return 2 ** (len(block_out_channels) - 1) * int(vae_factor)


def sampling_side(crop_px: int, *, max_side: int, step: int, min_side: int, multiple: int = 1) -> int:
    """Side (pixels) at which a completion crop is sampled: its own scale, rounded up to a bucket.

    ``crop_px`` rounded UP to a multiple of ``step``, at least ``min_side`` (itself rounded up to ``step``), at most
    ``max_side``. A crop is therefore never upsampled to the model's maximum: it is enlarged by less than one
    ``step`` (or to ``min_side``); a crop larger than ``max_side`` is downsampled to it. Few distinct sides
    (buckets) let crops of one side be batched together.

    Args:
        crop_px: the crop's larger side, pixels (>= 1).
        max_side: the model's largest (native) side, pixels; a multiple of ``multiple``.
        step: bucket step, pixels; a multiple of ``multiple``.
        min_side: smallest sampling side, pixels.
        multiple: what the model needs every side to be a multiple of (SD3: VAE factor 8 x patch 2 = 16; a
            pixel-space UNet: :func:`unet_side_multiple`).

    Returns:
        The sampling side: a multiple of ``multiple``, at most ``max_side``, and ``>= crop_px`` when
        ``crop_px <= max_side``.

    Raises:
        ValueError: a non-positive argument, or ``step`` / ``max_side`` not a multiple of ``multiple``.
    """
    if min(crop_px, max_side, step, multiple) < 1 or min_side < 0:
        raise ValueError(
            f"sampling_side needs positive sizes, got crop {crop_px}, max {max_side}, step {step}, "
            f"min {min_side}, multiple {multiple}"
        )
    if step % multiple or max_side % multiple:
        raise ValueError(
            f"the bucket step ({step} px) and the maximum side ({max_side} px) must be multiples of {multiple} px"
        )
    return min(max_side, _round_up(max(crop_px, min_side), step))


# ---------------------------------------------------------------- stage 2


class NeuralSceneBackend:
    """Stage 2 with an open-vocabulary detector (OWLv2) and SAM; see the module docstring for the rules.

    Args:
        cfg: engine configuration (weights references, vocabulary, thresholds, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment).
        cache_dir: local weights cache; None means :func:`default_cache_dir`.

    Attributes:
        weights: exact references of the weights loaded, [sam, detector, captioner] (no captioner when
            ``captioner_weights`` is empty).
        captioner: the :class:`NeuralCaptioner`, or None.
    """

    name = "neural"

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.cfg = cfg or EngineConfig()
        self.device = select_device(self.cfg)
        self.vocabulary = _vocabulary(self.cfg)
        reg = _registry(registry)
        cache = cache_dir if cache_dir is not None else default_cache_dir(self.cfg)
        sam_ref, det_ref = weights_refs(self.cfg)[:2]
        sam_w = _fetch(reg, sam_ref, cache, "SAM")
        det_w = _fetch(reg, det_ref, cache, "detector")
        self.weights = [sam_w.ref, det_w.ref]
        self.sam = load_sam(sam_w.path, self.device)
        self.owl = load_owlv2(det_w.path, self.device)
        self.captioner = None
        if _captioner_ref(self.cfg):
            self.captioner = NeuralCaptioner(self.cfg, registry=reg, cache_dir=cache, device=self.device)
            self.weights += self.captioner.weights
        self.threshold = float(_cfg(self.cfg, "detector_threshold", DEFAULT_DETECTOR_THRESHOLD))
        self.fallback = bool(_cfg(self.cfg, "detector_fallback", DEFAULT_DETECTOR_FALLBACK))
        self._query_embeds = self._embed_queries()

    def _embed_queries(self) -> torch.Tensor:
        owl = self.owl
        max_len = owl.model.config.text_config.max_position_embeddings
        tokens = owl.tokenizer(
            [_QUERY_TEMPLATE.format(w) for w in self.vocabulary],
            padding="max_length",
            max_length=max_len,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode(), _autocast(self.device):
            out = owl.model.owlv2.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        embeds = out.pooler_output if hasattr(out, "pooler_output") else out
        return embeds.float()  # (Q, D)

    # ------------------------------------------------------------ public
    def detect(self, image: np.ndarray) -> list[Entity]:
        """Candidate entities of one image.

        Args:
            image: HxWx3 uint8 RGB.

        Returns:
            At most ``cfg.max_entities`` entities, ``entity_id`` 0..n-1 in descending score; masks HxW bool,
            disjoint, non-empty, within the configured area fractions; labels from the vocabulary; ``caption``
            set when a captioner is configured.

        Raises:
            ValueError: the image is not HxWx3 uint8.
        """
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Entity]]:
        """:meth:`detect` for several images: one detector pass and one SAM encoder pass for the batch, and
        the crops of every entity of the batch through the captioner together.

        Args:
            images: list of HxWx3 uint8 RGB images (sizes may differ).

        Returns:
            One list of entities per image, in order.
        """
        for im in images:
            _check_image(im)
        if not images:
            return []
        with torch.inference_mode():
            boxes = self._detect_boxes(images)
            masks = self._segment(images, [b[0] for b in boxes])
        entities = [
            self._entities(im, m, s, lab) for im, (_, s, lab), m in zip(images, boxes, masks, strict=True)
        ]
        if self.captioner is not None:
            self.captioner.caption_entities(images, entities)
        return entities

    # ------------------------------------------------------------ detector
    def _owl_input(self, image: np.ndarray) -> np.ndarray:
        # OWLv2's processor: pad bottom/right to a square with grey, resize, normalise.
        h, w = image.shape[:2]
        side = max(h, w)
        square = np.full((side, side, 3), 128, np.uint8)
        square[:h, :w] = image
        size = self.owl.image_size
        x = _resize(square, (size, size)).astype(np.float32) / 255.0
        return ((x - self.owl.mean) / self.owl.std).transpose(2, 0, 1)

    def _detect_boxes(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """Per image: (boxes Nx4 float xyxy pixels, scores N, labels N) after clipping, NMS and selection."""
        from torchvision.ops import nms

        model = self.owl.model
        pixels = torch.from_numpy(np.stack([self._owl_input(im) for im in images])).to(self.device)
        with _autocast(self.device):
            feature_map, _ = model.image_embedder(pixel_values=pixels)
            b, ph, pw, d = feature_map.shape
            feats = feature_map.reshape(b, ph * pw, d)
            queries = self._query_embeds[None].expand(b, -1, -1).to(feats.dtype)
            logits, _ = model.class_predictor(feats, queries, None)
            pred = model.box_predictor(feats, feature_map)
        probs = torch.sigmoid(logits.float())  # (B, P, Q)
        best, label_idx = probs.max(dim=-1)
        out = []
        keep_n = 2 * self.cfg.max_entities
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            side = float(max(h, w))
            cx, cy, bw, bh = pred[i].float().unbind(-1)
            xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * side
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            ok = ((xyxy[:, 2] - xyxy[:, 0]) >= _MIN_BOX_PX) & ((xyxy[:, 3] - xyxy[:, 1]) >= _MIN_BOX_PX)
            idx = torch.nonzero(ok).flatten()
            idx = idx[nms(xyxy[idx], best[i, idx], _NMS_IOU)]  # sorted by descending score
            passed = idx[best[i, idx] >= self.threshold]
            if len(passed) == 0 and self.fallback:
                passed = idx
            passed = passed[:keep_n]
            out.append(
                (
                    xyxy[passed].cpu().numpy(),
                    best[i, passed].cpu().numpy(),
                    [self.vocabulary[k] for k in label_idx[i, passed].tolist()],
                )
            )
        return out

    # ------------------------------------------------------------ SAM
    def _sam_input(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        size = self.sam.image_encoder.img_size
        h, w = image.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
        x = _resize(image, (nw, nh)).astype(np.float32)
        mean = self.sam.pixel_mean.view(-1).cpu().numpy()
        std = self.sam.pixel_std.view(-1).cpu().numpy()
        out = np.zeros((3, size, size), np.float32)  # zero padding after normalisation, as Sam.preprocess
        out[:, :nh, :nw] = ((x - mean) / std).transpose(2, 0, 1)
        return out, (nh, nw)

    def _segment(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Per image: NxHxW bool masks of its boxes (one image embedding, all boxes at once)."""
        sam = self.sam
        todo = [i for i, b in enumerate(boxes) if len(b)]
        out = [np.zeros((0, *im.shape[:2]), bool) for im in images]
        if not todo:
            return out
        inputs = [self._sam_input(images[i]) for i in todo]
        pixels = torch.from_numpy(np.stack([x for x, _ in inputs])).to(self.device)
        with _autocast(self.device):
            embeddings = sam.image_encoder(pixels)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        for k, i in enumerate(todo):
            h, w = images[i].shape[:2]
            scale = sam.image_encoder.img_size / max(h, w)
            box = torch.as_tensor(boxes[i] * scale, dtype=torch.float32, device=self.device)
            with _autocast(self.device):
                sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embeddings[k : k + 1],
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
            logits = sam.postprocess_masks(low_res.float(), inputs[k][1], (h, w))
            masks = (logits[:, 0] > sam.mask_threshold).cpu().numpy()
            for j, (x0, y0, x1, y1) in enumerate(boxes[i]):
                mx, my = _BOX_MARGIN * (x1 - x0), _BOX_MARGIN * (y1 - y0)
                clip = np.zeros((h, w), bool)
                clip[
                    max(0, int(y0 - my)) : int(np.ceil(y1 + my)), max(0, int(x0 - mx)) : int(np.ceil(x1 + mx))
                ] = 1
                masks[j] &= clip
            out[i] = masks
        return out

    # ------------------------------------------------------------ entities
    def _entities(
        self, image: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: list[str]
    ) -> list[Entity]:
        from reflade.engine.backends.classical_scene import entity_attributes

        h, w = image.shape[:2]
        min_px = max(1.0, self.cfg.min_entity_area * h * w)
        max_px = self.cfg.max_entity_area * h * w
        taken = np.zeros((h, w), bool)
        kept: list[tuple[Entity, np.ndarray]] = []  # (entity, its full SAM mask)
        for mask, score, label in zip(masks, scores, labels, strict=True):
            if len(kept) >= self.cfg.max_entities:
                break
            area = int(mask.sum())
            if area == 0:
                continue
            if any(_iou(mask, full) > self.cfg.merge_iou for _, full in kept):
                continue
            visible = mask & ~taken
            n = int(visible.sum())
            if not min_px <= n <= max_px:
                continue
            lost_min = max(_MIN_OVERLAP_PX, _MIN_OVERLAP * area)
            occluders = [e.entity_id for e, _ in kept if np.count_nonzero(mask & e.mask) >= lost_min]
            ent = Entity(
                entity_id=len(kept),
                box=mask_box(visible),
                mask=visible,
                label=label,
                score=round(float(score), 4),
                source=SOURCE,
                attributes=entity_attributes(image, visible),
                occluded_by=occluders,
            )
            taken |= visible
            kept.append((ent, mask))
        return [e for e, _ in kept]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    return inter / max(1, np.count_nonzero(a | b))


# ---------------------------------------------------------------- stage 2: captions


class NeuralCaptioner:
    """Captions of image crops with a BLIP captioning model (``BlipForConditionalGeneration``) loaded from the
    registry; greedy decoding, so a crop's caption is deterministic.

    Args:
        cfg: engine configuration (``captioner_weights``, ``caption_max_new_tokens``, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment).
        cache_dir: local weights cache; None means :func:`default_cache_dir`.
        device: where the model runs; None means :func:`select_device`.

    Attributes:
        weights: exact references of the weights loaded, [captioner].
        max_new_tokens: tokens generated at most per crop (``caption_max_new_tokens``, capped by the model's
            position embeddings).

    Raises:
        ValueError: ``captioner_weights`` is empty, or ``caption_max_new_tokens`` < 1.
    """

    name = "neural"

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | None = None,
    ):
        self.cfg = cfg or EngineConfig()
        ref = _captioner_ref(self.cfg)
        if not ref:
            raise ValueError("engine.captioner_weights is empty: there is no captioner to load")
        requested = int(_cfg(self.cfg, "caption_max_new_tokens", DEFAULT_CAPTION_MAX_NEW_TOKENS))
        if requested < 1:
            raise ValueError(f"engine.caption_max_new_tokens must be at least 1, got {requested}")
        self.device = device if device is not None else select_device(self.cfg)
        cache = cache_dir if cache_dir is not None else default_cache_dir(self.cfg)
        local = _fetch(_registry(registry), ref, cache, "captioner")
        self.weights = [local.ref]
        self.blip = load_blip(local.path, self.device)
        # The decoder starts from one [DEC] token: what it generates must fit its position embeddings.
        room = int(self.blip.model.config.text_config.max_position_embeddings) - 1
        self.max_new_tokens = max(1, min(requested, room))

    def caption(self, crops: list[np.ndarray]) -> list[str]:
        """One caption per crop.

        Args:
            crops: HxWx3 uint8 RGB crops (sizes may differ; each is resized to the model's square input).

        Returns:
            The decoded captions, special tokens skipped, whitespace collapsed, at most ``max_new_tokens``
            words and ``_CAPTION_MAX_CHARS`` characters each (may be empty); not otherwise sanitised.

        Raises:
            ValueError: a crop that is not HxWx3 uint8.
        """
        for c in crops:
            _check_image(c)
        out: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(crops), _CAPTION_BATCH):
                chunk = crops[start : start + _CAPTION_BATCH]
                pixels = torch.from_numpy(np.stack([self._input(c) for c in chunk])).to(self.device)
                with _autocast(self.device):
                    ids = self.blip.model.generate(
                        pixel_values=pixels,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                    )
                texts = self.blip.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
                out += [" ".join(t.split())[:_CAPTION_MAX_CHARS] for t in texts]
        return out

    def caption_entities(self, images: list[np.ndarray], entities_list: list[list[Entity]]) -> None:
        """Caption every entity of every image together and set its ``caption`` (in place).

        Args:
            images: HxWx3 uint8 RGB images.
            entities_list: per image, its entities (``box`` in that image's pixels).
        """
        if len(images) != len(entities_list):
            raise ValueError(f"{len(images)} images but {len(entities_list)} entity lists")
        todo = [(image, ent) for image, ents in zip(images, entities_list, strict=True) for ent in ents]
        captions = self.caption([_caption_crop(image, ent.box) for image, ent in todo])
        for (_, ent), text in zip(todo, captions, strict=True):
            ent.caption = text

    def _input(self, crop: np.ndarray) -> np.ndarray:
        # BLIP's image processor: resize to the square input (no aspect kept), scale to [0, 1], normalise.
        size = self.blip.image_size
        x = _resize(crop, (size, size)).astype(np.float32) / 255.0
        return ((x - self.blip.mean) / self.blip.std).transpose(2, 0, 1)


def _caption_crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """What the captioner sees of an entity: its box grown by ``_CAPTION_MARGIN`` per side, clipped."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = max(2.0, _CAPTION_MARGIN * (x1 - x0)), max(2.0, _CAPTION_MARGIN * (y1 - y0))
    cx0, cy0 = max(0, int(x0 - mx)), max(0, int(y0 - my))
    cx1, cy1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
    if cx1 <= cx0 or cy1 <= cy0:  # a box off the image: caption the whole image rather than nothing
        return image
    return np.ascontiguousarray(image[cy0:cy1, cx0:cx1])


# ---------------------------------------------------------------- stage 3


@dataclass
class _Hole:
    image: int
    """Index of the image in the batch."""
    entity: int
    """Index of the entity in its image's list."""
    kind: str
    """``background`` or ``amodal``."""
    hole: np.ndarray
    """HxW bool: pixels pasted from the sample."""
    unknown: np.ndarray
    """HxW bool, ``hole`` included: pixels the sampler must not take as known."""
    seed: int
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    result: np.ndarray | None = None
    """The sampled crop, resized back to the crop's size, uint8 RGB."""


class NeuralCompletionBackend:
    """Stage 3 with an unconditional diffusion UNet and RePaint sampling; see the module docstring.

    Args:
        cfg: engine configuration (``completion_weights``, ``completion_steps``, ``completion_dilate_px``,
            ``completion_seed``, ``num_gpus``).
        registry: where the weights live; None builds one from ``load_config()`` (the worker's environment).
        cache_dir: local weights cache; None means :func:`default_cache_dir`.

    Attributes:
        weights: exact references of the weights loaded, [completion].
        size: the UNet's ``sample_size``, the largest sampling side (pixels).
        side_multiple: what every sampling side is a multiple of (:func:`unet_side_multiple`), pixels.
        bucket_step, min_side: sampling sides are multiples of ``bucket_step`` and at least ``min_side``, pixels.
    """

    name = "neural"

    def __init__(
        self,
        cfg: EngineConfig | None = None,
        *,
        registry: Registry | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.cfg = cfg or EngineConfig()
        self.device = select_device(self.cfg)
        reg = _registry(registry)
        cache = cache_dir if cache_dir is not None else default_cache_dir(self.cfg)
        local = _fetch(reg, weights_refs(self.cfg)[2], cache, "completion")
        self.weights = [local.ref]
        self.unet, self.scheduler = load_repaint(local.path, self.device)
        self.size = int(self.unet.config.sample_size)
        self.side_multiple = unet_side_multiple(self.unet.config.block_out_channels)
        self.bucket_step = _round_up(self.size * _BUCKET_FRACTION, self.side_multiple)
        self.min_side = _round_up(self.size * _MIN_SIDE_FRACTION, self.bucket_step)
        self.sampling_side(self.size)  # a sample_size the UNet cannot run at fails here, not mid-batch
        self.steps = int(_cfg(self.cfg, "completion_steps", DEFAULT_COMPLETION_STEPS))
        self.dilate_px = int(_cfg(self.cfg, "completion_dilate_px", DEFAULT_COMPLETION_DILATE_PX))
        self.seed = int(_cfg(self.cfg, "completion_seed", DEFAULT_COMPLETION_SEED))

    def complete(self, image: np.ndarray, entities: list[Entity]) -> list[Completion]:
        """Amodal layer and background of each entity of one image.

        Args:
            image: HxWx3 uint8 RGB.
            entities: stage-2 entities of the image (masks HxW bool).

        Returns:
            One :class:`Completion` per entity, in order: ``rgba`` HxWx4 uint8 (alpha 255 on the amodal mask,
            RGB = 0 where alpha = 0, the image's pixels on the visible mask), ``amodal_mask`` HxW bool,
            ``background`` HxWx3 uint8 (equal to the image outside the dilated entity mask), ``scores``
            ``completed_fraction`` (completed / amodal pixels) and ``background_fill_fraction`` (filled /
            image pixels).

        Raises:
            ValueError: the image is not HxWx3 uint8, or a mask does not match it.
        """
        return self.complete_batch([image], [entities])[0]

    def complete_batch(
        self, images: list[np.ndarray], entities_list: list[list[Entity]]
    ) -> list[list[Completion]]:
        """:meth:`complete` for several images, every hole of every image through the sampler together."""
        if len(images) != len(entities_list):
            raise ValueError(f"{len(images)} images but {len(entities_list)} entity lists")
        holes: list[_Hole] = []
        for i, (image, entities) in enumerate(zip(images, entities_list, strict=True)):
            _check_image(image)
            holes += self._holes(i, image, entities)
        buckets: dict[int, list[_Hole]] = {}
        for h in holes:
            h.crop = self._crop(h, images[h.image].shape[:2])
            x0, y0, x1, y1 = h.crop
            buckets.setdefault(self.sampling_side(max(x1 - x0, y1 - y0)), []).append(h)
        with torch.inference_mode():
            for side, group in sorted(buckets.items()):
                for start in range(0, len(group), _SAMPLER_BATCH):
                    batch = group[start : start + _SAMPLER_BATCH]
                    self._sample([images[h.image] for h in batch], batch, side)
        by_key = {(h.image, h.entity, h.kind): h for h in holes}
        out: list[list[Completion]] = []
        for i, (image, entities) in enumerate(zip(images, entities_list, strict=True)):
            comps = []
            for k, ent in enumerate(entities):
                visible = ent.mask.astype(bool)
                background = image.copy()
                amodal = visible.copy()
                bg_hole = by_key.get((i, k, "background"))
                if bg_hole is not None:
                    _paste(background, bg_hole)
                rgb = np.where(visible[..., None], image, 0).astype(np.uint8)
                am_hole = by_key.get((i, k, "amodal"))
                if am_hole is not None:
                    _paste(rgb, am_hole)
                    amodal |= am_hole.hole
                alpha = np.where(amodal, 255, 0).astype(np.uint8)
                completed = int(np.count_nonzero(amodal & ~visible))
                comps.append(
                    Completion(
                        rgba=np.dstack([rgb, alpha]),
                        amodal_mask=amodal,
                        background=background,
                        scores={
                            "completed_fraction": round(completed / max(1, int(amodal.sum())), 6),
                            "background_fill_fraction": round(
                                (int(bg_hole.hole.sum()) if bg_hole is not None else 0) / visible.size, 6
                            ),
                        },
                    )
                )
            out.append(comps)
        return out

    # ------------------------------------------------------------ holes
    def _holes(self, i: int, image: np.ndarray, entities: list[Entity]) -> list[_Hole]:
        h, w = image.shape[:2]
        digest = hashlib.sha256(image.tobytes()).digest() + np.asarray(image.shape, np.int64).tobytes()
        masks = {}
        for ent in entities:
            m = np.asarray(ent.mask).astype(bool)
            if m.shape != (h, w):
                raise ValueError(f"entity {ent.entity_id}: mask {m.shape} does not match the image {(h, w)}")
            masks[ent.entity_id] = m

        def seed(ent: Entity, kind: str) -> int:
            key = hashlib.sha256(digest + f"|{ent.entity_id}|{kind}|{self.seed}".encode()).digest()
            return int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * self.dilate_px + 1,) * 2)
        out = []
        for k, ent in enumerate(entities):
            visible = masks[ent.entity_id]
            if not visible.any():
                continue
            bg = cv2.dilate(visible.astype(np.uint8), kernel).astype(bool) if self.dilate_px > 0 else visible
            out.append(_Hole(i, k, "background", bg, bg, seed(ent, "background")))
            front = np.zeros((h, w), bool)
            for j in ent.occluded_by:
                if j in masks and j != ent.entity_id:
                    front |= masks[j]
            hidden = _hull(visible) & front & ~visible
            if hidden.any():
                out.append(_Hole(i, k, "amodal", hidden, hidden | front, seed(ent, "amodal")))
        return out

    def sampling_side(self, crop_px: int) -> int:
        """Side (pixels) at which a crop of ``crop_px`` is sampled by this UNet (:func:`sampling_side`)."""
        return sampling_side(
            crop_px,
            max_side=self.size,
            step=self.bucket_step,
            min_side=self.min_side,
            multiple=self.side_multiple,
        )

    def _crop(self, hole: _Hole, shape: tuple[int, int]) -> tuple[int, int, int, int]:
        h, w = shape
        x0, y0, x1, y1 = mask_box(hole.hole)
        side = max(_MIN_CROP_PX, int(np.ceil(_CONTEXT * max(x1 - x0, y1 - y0))))
        cw, ch = min(side, w), min(side, h)
        cx0 = int(np.clip((x0 + x1) / 2 - cw / 2, 0, w - cw))
        cy0 = int(np.clip((y0 + y1) / 2 - ch / 2, 0, h - ch))
        return cx0, cy0, cx0 + cw, cy0 + ch

    def _sample(self, images: list[np.ndarray], holes: list[_Hole], side: int) -> None:
        """RePaint over a batch of holes (crops set) at ``side`` x ``side`` pixels; fills each hole's ``result``."""
        from diffusers.utils.torch_utils import randn_tensor

        s = side
        known, keep = [], []
        for image, hole in zip(images, holes, strict=True):
            x0, y0, x1, y1 = hole.crop
            patch = _resize(image[y0:y1, x0:x1], (s, s)).astype(np.float32) / 127.5 - 1.0
            # any trace of the hole in a small pixel makes it unknown: the sampler must not copy hole pixels
            unknown = _resize(hole.unknown[y0:y1, x0:x1].astype(np.float32), (s, s)) > 0
            known.append(patch.transpose(2, 0, 1))
            keep.append((~unknown).astype(np.float32)[None])
        original = torch.from_numpy(np.stack(known)).to(self.device)
        mask = torch.from_numpy(np.stack(keep)).to(self.device)
        generators = [torch.Generator("cpu").manual_seed(h.seed) for h in holes]
        sched = self.scheduler
        # Timesteps stay on the CPU: the scheduler indexes its CPU tables with them; the UNet moves them itself.
        sched.set_timesteps(self.steps, jump_length=_JUMP_LENGTH, jump_n_sample=_JUMP_N_SAMPLE)
        sched.eta = 0.0
        x = randn_tensor(tuple(original.shape), generator=generators, device=self.device, dtype=torch.float32)
        t_last = sched.timesteps[0] + 1
        for t in sched.timesteps:
            if t < t_last:
                with _autocast(self.device):
                    eps = self.unet(x, t).sample
                x = sched.step(eps.float(), t, x, original, mask, generators).prev_sample
            else:
                x = sched.undo_step(x, t_last, generators)
            t_last = t
        result = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for hole, sample in zip(holes, result, strict=True):
            x0, y0, x1, y1 = hole.crop
            hole.result = _resize(sample, (x1 - x0, y1 - y0))


def _paste(target: np.ndarray, hole: _Hole) -> None:
    """Copy the sampled pixels into ``target`` (HxWx3 uint8) inside the hole only."""
    x0, y0, x1, y1 = hole.crop  # the crop always holds the whole hole (see _crop)
    inside = hole.hole[y0:y1, x0:x1]
    target[y0:y1, x0:x1][inside] = hole.result[inside]
