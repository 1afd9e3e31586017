"""Randomly initialised checkpoints of the ``neural`` backends' models, in the layouts their loaders read
(:mod:`.neural_models`, :mod:`.sd3_inpaint`), at the real models' sizes or any other configuration.

Throughput does not depend on the weights' values, so a real-size random checkpoint measures what the real one
costs (on a GPU: ``bench/gpu_engine.py``) without importing the real weights. The writers here are shared with
:mod:`.tiny_weights`, which calls them with tiny configurations; the real sizes are named here:

- ``sam-vit-h-random``: SAM ViT-H (``segment_anything.build_sam_vit_h``'s arguments: 1024 px, width 1280, depth
  32, 16 heads, global attention in blocks 7/15/23/31), ``config.json`` + ``model.safetensors``;
- ``owlv2-base-16-random``: OWLv2-base/16 (``Owlv2Config()``'s defaults: ViT-B/16 at 768 px, a 12-layer text
  model of width 512), with the word-level tokenizer of the tiny detector (the queries' words);
- ``blip-base-random``: a BLIP captioner of ``Salesforce/blip-image-captioning-base``'s sizes (224 M; ViT-B/16 at
  384 px, a 12-layer text decoder of width 768, 30,524 tokens), with a word-level tokenizer over synthetic tokens at
  BERT's special-token ids (random weights caption junk whatever the vocabulary; the ids match BLIP's);
- ``sd3-medium-inpaint-random``: a ``StableDiffusion3InpaintPipeline`` folder with SD3-medium's transformer
  (24 layers, 24 heads of 64, patch 2, latent 128) and SD3's VAE (4 levels of 128/256/512/512 channels, 16 latent
  channels), flow-matching scheduler with shift 3.0, no text encoders (the backend conditions on zero
  embeddings; a real SD3 folder's encoders are used once at load and dropped). Saved in bfloat16.

Every model is built with ``torch.manual_seed`` first, so a folder's bytes depend only on the seed, the
configuration and the library versions. ``device`` builds the models on a GPU when one is there (seconds instead
of minutes for 2 B parameters); the saved tensors are the same kind of random values either way, not the same
values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from reflade.engine.backends.sd3_inpaint import TEXT_COMPONENTS

__all__ = [
    "BLIP_BASE",
    "OWLV2_BASE_16",
    "REAL_NAMES",
    "SAM_VIT_H_CONFIG",
    "SD3_MEDIUM_TRANSFORMER",
    "SD3_VAE",
    "build_random_weights",
    "build_real_size_weights",
    "engine_weights",
    "word_tokenizer",
    "write_blip",
    "write_owlv2",
    "write_sam",
    "write_sd3_inpaint",
]

SEED = 0
_DONE = ".random-weights-done"
"""Written last into a real-size folder: a folder without it was interrupted and is rebuilt."""

SAM_VIT_H_CONFIG: dict = {
    "architecture": "sam",
    "image_size": 1024,
    "patch_size": 16,
    "encoder_embed_dim": 1280,
    "encoder_depth": 32,
    "encoder_num_heads": 16,
    "encoder_mlp_ratio": 4.0,
    "encoder_global_attn_indexes": [7, 15, 23, 31],
    "encoder_window_size": 14,
    "prompt_embed_dim": 256,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}
"""Constructor arguments of SAM ViT-H (636 M parameters), as :func:`.neural_models.build_sam` takes them."""
OWLV2_BASE_16: dict = {"text_config": {"vocab_size": 49408}, "vision_config": {}, "projection_dim": 512}
"""``Owlv2Config`` arguments of OWLv2-base/16 (155 M parameters): the library's defaults (CLIP's 49,408 tokens;
the tokenizer's words take the first ids, and its token ids are set by :func:`write_owlv2`)."""
BLIP_BASE: dict = {
    "text_config": {
        "vocab_size": 30524,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "vision_config": {"image_size": 384, "patch_size": 16},
    "projection_dim": 512,
    "image_text_hidden_size": 256,
}
"""``BlipConfig`` arguments of the base captioner (224 M distinct parameters; 247 M as its checkpoint stores them,
with the tied word embedding twice)."""
SD3_MEDIUM_TRANSFORMER: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
"""``SD3Transformer2DModel`` arguments of stabilityai/stable-diffusion-3-medium (2.0 B parameters)."""
SD3_VAE: dict = {
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
"""``AutoencoderKL`` arguments of SD3's VAE (84 M parameters, factor 8, 16 latent channels)."""
_BOX_HEAD_GAIN = 0.3
"""Gain of the detector's random last box layer (see :func:`write_owlv2`)."""
_BOX_SIZE_SHIFT = 1.2
"""Added to the width/height logits on a grid of 8 x 8 patches: sigmoid(logit(1/8) + 1.2) = 0.32 of the padded
image's side (on a grid of P patches the shift grows by logit(1/8) - logit(1/P), :func:`_box_size_shift`)."""


# ---------------------------------------------------------------- writers (shared with tiny_weights)


def write_sam(dest: Path, config: dict[str, Any], seed: int = SEED, device: str = "cpu") -> Path:
    """Build a random SAM from ``config`` and write ``config.json`` + ``model.safetensors`` into ``dest``."""
    from safetensors.torch import save_file

    from reflade.engine.backends.neural_models import build_sam

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):
        sam = build_sam(config)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # safetensors refuses shared or non-contiguous storage; a state dict of a fresh model has neither.
    state = {k: v.detach().contiguous().cpu() for k, v in sam.state_dict().items()}
    # One metadata key only: safetensors writes its metadata map in hash order, which varies between runs, and
    # identical bytes are what lets the registry deduplicate a rebuild.
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def word_tokenizer(words: list[str], *, max_len: int, bos_eos_template: bool = False, **specials: str):
    """A word-level ``PreTrainedTokenizerFast`` (NFKC, lower-cased, split on whitespace and punctuation).

    Args:
        words: the vocabulary; a word's id is its index.
        max_len: the tokenizer's ``model_max_length``.
        bos_eos_template: wrap every text in ``bos_token`` ... ``eos_token``.
        specials: role -> token (``pad_token``, ``unk_token`` (required), ``bos_token``, ...), each one of
            ``words``.

    Returns:
        (tokenizer, {token: id}).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_eos_template:
        bos, eos = specials["bos_token"], specials["eos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, **specials), vocab


def write_owlv2(
    dest: Path,
    tokenizer,
    vocab: dict[str, int],
    config: dict[str, Any],
    seed: int = SEED,
    device: str = "cpu",
) -> Path:
    """Build a random OWLv2 detector and write it, its tokenizer and its image-processor config into ``dest``.

    ``config`` holds ``Owlv2Config`` arguments; the text config's vocabulary size and pad/bos/eos ids are set from
    ``vocab`` (``<pad>``, ``<bos>``, ``<eos>``; OWL pools its text at the highest id, which must be ``<eos>``).
    The box head is re-initialised at unit gain with a small last layer (the default init swamps OWL's per-patch
    box prior: every box comes out huge or off the image), so that each patch proposes a box around itself, about
    a third of the image wide: random weights still give distinct, partly overlapping candidates (NMS, SAM
    prompts and occlusion all get exercised); likewise the class head's logit shift and scale.
    """
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    text = {
        **config.get("text_config", {}),
        "vocab_size": max(len(vocab), config.get("text_config", {}).get("vocab_size", 0)),
        "pad_token_id": vocab["<pad>"],
        "bos_token_id": vocab["<bos>"],
        "eos_token_id": vocab["<eos>"],
    }
    owl_config = Owlv2Config(**{**config, "text_config": text})
    torch.manual_seed(seed)
    with torch.device(device):
        model = Owlv2ForObjectDetection(owl_config).eval()
    head = model.box_head
    with torch.no_grad():
        for layer, gain in ((head.dense0, 1.0), (head.dense1, 1.0), (head.dense2, _BOX_HEAD_GAIN)):
            layer.weight.normal_(0.0, gain * layer.in_features**-0.5)
            layer.bias.zero_()
        shift = _box_size_shift(owl_config.vision_config.image_size // owl_config.vision_config.patch_size)
        head.dense2.bias.copy_(torch.tensor([0.0, 0.0, shift, shift]))
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.normal_(0.0, _BOX_HEAD_GAIN * layer.in_features**-0.5)
            layer.bias.zero_()
    model.cpu().save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    size = owl_config.vision_config.image_size
    Owlv2ImageProcessor(size={"height": size, "width": size}).save_pretrained(dest)
    return dest


def _box_size_shift(patches: int) -> float:
    """The width/height logit shift that makes a random OWL's boxes about a third of the image on a grid of
    ``patches`` x ``patches``: OWL's box prior is 1/``patches`` of the side (logit(1/P) = -log(P - 1)), so the
    shift is ``_BOX_SIZE_SHIFT`` + log((P - 1) / 7), exactly ``_BOX_SIZE_SHIFT`` on the tiny detector's 8 x 8
    grid (at 768 px / 16 = 48: 3.1, boxes of 0.32 of the side instead of 0.07)."""
    return _BOX_SIZE_SHIFT + math.log((patches - 1) / 7)


def write_blip(dest: Path, tokenizer, config: dict[str, Any], seed: int = SEED, device: str = "cpu") -> Path:
    """Build a random BLIP captioner (``BlipForConditionalGeneration``) and write it, ``tokenizer`` and its
    image-processor config into ``dest``. ``config`` holds ``BlipConfig`` arguments; the text config's vocabulary
    size (at least the tokenizer's) and pad/bos (``[DEC]``)/sep ids come from the tokenizer, and a caption ends at
    ``[SEP]`` as BLIP's does."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    text = {
        **config.get("text_config", {}),
        "vocab_size": max(len(tokenizer), config.get("text_config", {}).get("vocab_size", 0)),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    blip_config = BlipConfig(**{**config, "text_config": text})
    torch.manual_seed(seed)
    with torch.device(device):
        model = BlipForConditionalGeneration(blip_config).eval()
    model.cpu().save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    size = blip_config.vision_config.image_size
    BlipImageProcessor(size={"height": size, "width": size}).save_pretrained(dest)
    return dest


def write_sd3_inpaint(
    dest: Path,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    seed: int = SEED,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random SD3 inpainting checkpoint without text encoders and write it into ``dest``:
    ``transformer/`` (``SD3Transformer2DModel(**transformer)``), ``vae/`` (``AutoencoderKL(**vae)``),
    ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``, shift 3.0) and ``model_index.json``, in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3InpaintPipeline,
    )
    from diffusers.utils import logging as diffusers_logging

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):
        net = SD3Transformer2DModel(**transformer).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        autoencoder = AutoencoderKL(**vae).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3InpaintPipeline(
        transformer=net.to("cpu", dtype),
        scheduler=scheduler,
        vae=autoencoder.to("cpu", dtype),
        **dict.fromkeys(TEXT_COMPONENTS),
    )
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "text_encoder=None cannot be saved": absent on purpose
    try:
        pipe.save_pretrained(dest, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(level)
    return dest


# ---------------------------------------------------------------- the real sizes


def _blip_tokenizer():
    """BLIP's token ids (BERT's specials, ``[DEC]`` after BERT's 30,522 tokens) over synthetic words."""
    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 30522: "[DEC]"}
    words = [special.get(i, f"t{i}") for i in range(BLIP_BASE["text_config"]["vocab_size"])]
    tokenizer, _ = word_tokenizer(
        words,
        max_len=512,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    return tokenizer


def _sam_vit_h(dest: Path, device: str) -> Path:
    return write_sam(dest, SAM_VIT_H_CONFIG, device=device)


def _owlv2_base(dest: Path, device: str) -> Path:
    from reflade.engine.backends.tiny_weights import detector_tokenizer

    tokenizer, vocab = detector_tokenizer()
    return write_owlv2(dest, tokenizer, vocab, OWLV2_BASE_16, device=device)


def _blip_base(dest: Path, device: str) -> Path:
    return write_blip(dest, _blip_tokenizer(), BLIP_BASE, device=device)


def _sd3_medium(dest: Path, device: str) -> Path:
    return write_sd3_inpaint(dest, SD3_MEDIUM_TRANSFORMER, SD3_VAE, device=device, dtype=torch.bfloat16)


REAL_BUILDERS: dict[str, Callable[[Path, str], Path]] = {
    "sam-vit-h-random": _sam_vit_h,
    "owlv2-base-16-random": _owlv2_base,
    "blip-base-random": _blip_base,
    "sd3-medium-inpaint-random": _sd3_medium,
}
REAL_NAMES = tuple(REAL_BUILDERS)
"""Folder names of the real-size random checkpoints (:func:`build_real_size_weights`)."""
_SIZES: dict[str, dict[str, str]] = {
    "tiny": {
        "sam_weights": "weights/tiny-sam",
        "detector_weights": "weights/tiny-owlv2",
        "captioner_weights": "weights/tiny-blip",
        "sd3_weights": "weights/tiny-sd3-inpaint",
    },
    "real": {
        "sam_weights": "weights/sam-vit-h-random",
        "detector_weights": "weights/owlv2-base-16-random",
        "captioner_weights": "weights/blip-base-random",
        "sd3_weights": "weights/sd3-medium-inpaint-random",
    },
}


def engine_weights(size: str) -> dict[str, str]:
    """The ``EngineConfig`` fields that point the neural family at random checkpoints of ``size``: ``tiny``
    (:mod:`.tiny_weights`) or ``real`` (:data:`REAL_NAMES`), with SD3-family completion. With
    ``weights_dir`` set to the folder :func:`build_real_size_weights` (or ``tiny_weights.build_tiny_weights``)
    wrote, the backends load them from disk.

    Raises:
        ValueError: an unknown size.
    """
    if size not in _SIZES:
        raise ValueError(f"unknown weights size {size!r} (known: {', '.join(_SIZES)})")
    return {**_SIZES[size], "completion_model": "sd3-inpaint"}


def build_real_size_weights(
    dest: Path, names: Iterable[str] | None = None, *, device: str = "cpu", log: Callable[[str], Any] = print
) -> dict[str, Path]:
    """Write the real-size random checkpoints into ``dest/<name>/``; a folder already there is kept (written
    once: a marker file goes in last).

    Args:
        dest: parent folder (created). About 9 GB: SAM 2.5, OWLv2 0.6, BLIP 1.0 (float32), SD3 4.2 (bfloat16).
        names: subset of :data:`REAL_NAMES`; None: all.
        device: where the models are built (``cuda``: much faster); they are saved from the CPU.

    Returns:
        {name: folder}.

    Raises:
        ValueError: an unknown name.
    """
    import shutil
    import time

    names = list(REAL_NAMES if names is None else names)
    unknown = [n for n in names if n not in REAL_BUILDERS]
    if unknown:
        raise ValueError(f"unknown real-size weights {', '.join(unknown)} (known: {', '.join(REAL_NAMES)})")
    out = {}
    for name in names:
        folder = Path(dest) / name
        if not (folder / _DONE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a half-written folder from an interrupted build
            t0 = time.perf_counter()
            REAL_BUILDERS[name](folder, device)
            (folder / _DONE).write_text(json.dumps({"seed": SEED, "random_init": True}) + "\n")
            log(f"built {name} in {time.perf_counter() - t0:.1f} s")
        out[name] = folder
    return out


def build_random_weights(dest: Path, size: str, *, device: str = "cpu") -> dict[str, Path]:
    """The random checkpoints of ``size`` in ``dest/<name>/``, written where missing: ``real``
    (:func:`build_real_size_weights`) or ``tiny`` (every :mod:`.tiny_weights` model). Point
    ``engine.weights_dir`` at ``dest`` and set :func:`engine_weights` to run the neural family on them.

    Returns:
        {name: folder}.

    Raises:
        ValueError: an unknown size.
    """
    engine_weights(size)  # names the sizes in its error
    if size == "real":
        return build_real_size_weights(dest, device=device)
    from reflade.engine.backends.tiny_weights import ALL_TINY_NAMES, build_tiny_weights

    missing = [n for n in ALL_TINY_NAMES if not (Path(dest) / n).is_dir()]
    if missing:
        build_tiny_weights(Path(dest), missing)
    return {n: Path(dest) / n for n in ALL_TINY_NAMES}
