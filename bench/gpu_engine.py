"""Benchmark: the data engine's neural stages at real model sizes on one GPU, without Ray or the object store.

Models are built from their configurations with random weights (throughput does not depend on the weights):

- OWLv2-base/16 (``transformers.Owlv2ForObjectDetection``, ``Owlv2Config()`` defaults) at 768 px; the text
  queries (one per word of the engine's default vocabulary) are encoded once from random token ids of the right
  shape, no tokenizer;
- SAM ViT-H (``segment_anything`` modeling classes, embed 1280, depth 32, 16 heads, global attention in blocks
  7/15/23/31): the image encoder on batches of ``--batch`` images, then prompt encoder + mask decoder with 16
  boxes per image (the detector's 16 best boxes);
- completion, per hole, as the RefLayer-style SD3 inpainting would run it: the hole's square crop resized to its
  sampling side, one SD3-VAE encode (``AutoencoderKL``, 16 latent channels), ``--steps`` flow-matching Euler steps
  of an SD3-medium-size ``SD3Transformer2DModel`` (24 layers, 24 heads of 64, shift 3.0, no classifier-free
  guidance unless ``--cfg``) on the (side/8)x(side/8)x16 latent with the known region re-noised every step, one VAE
  decode; random prompt embeddings (B, 333, 4096) and pooled (B, 2048) stand in for the text encoders. Holes follow
  the neural completion backend's rule on each synthetic scene's ground truth: one background hole per entity (its
  visible mask dilated by 4 px) plus one amodal hole per occluded entity; a hole's crop is a square of CONTEXT (2)
  times the hole's larger side, at least MIN_CROP_PX (32), clipped to the image;
- sampling sides (``--completion-sides``): ``bucketed`` (default) samples each crop at its own scale, as the neural
  completion backend does (``reflade.engine.backends.neural.sampling_side``): the crop's side rounded UP to a
  multiple of ``--bucket-step`` (full 256 px), at least ``--min-side`` (full 512 px), at most the model's 1024 px
  (larger crops are downsampled to it); steps and sides are multiples of 16 (VAE factor 8 x patch 2). A crop is
  thus enlarged by less than one step (or to the minimum) instead of being upsampled to 1024 px: a 300 px crop
  runs at 512 px (1024 latent tokens) instead of 1024 px (4096 tokens). Holes are grouped by side and each group
  goes through VAE encode / transformer / VAE decode in batches of ``--sd3-batch`` / ``--vae-batch``.
  ``fixed`` samples every crop at 1024 px (the behaviour the first H100 figures measured), for comparison;
- matting on the CPU: the engine's own ``ClassicalMattingBackend`` (pymatting) on every entity of each scene, in a
  ``ProcessPoolExecutor`` (spawned workers, one thread each) that overlaps the GPU work as the Ray pipeline's CPU
  actors would.

Scenes: ``reflade.engine.synth.make_scene(seed, size=(S, S))`` for seeds 0..N-1 (made before any timer starts).

Cases, each timed after warm-up iterations (excluded), CUDA synchronised around every timer, peak GPU memory
reset before each case; the JSON (``--out``) is rewritten after every case, so a later failure (an OOM, a crash)
keeps the figures already measured:

  owlv2, sam_encoder, sam_decoder, vae_encode, sd3_transformer, vae_decode, matting   (each stage alone; the
        three completion stages at the model's full side, 1024 px, whatever ``--completion-sides`` says: that is
        what their anchors are for)
  e2e   the whole pipeline over all scenes, groups of ``--batch`` images: CPU preprocessing, OWLv2, SAM encoder,
        SAM decoder (masks back to the CPU), completion of every hole at the sides ``--completion-sides`` chose
        (``--completion-schedule queue``, the default: the holes wait in one queue per side across groups and a
        side runs whenever it holds a full ``--sd3-batch``, the partial batches after the last group, and a scene
        goes to matting as soon as its last hole is done; ``group``: each group's holes, one bucket of equal
        sides after another, before the next group), matting submitted to the pool (``--matting-unit``: one job
        per layer, the default, or one per scene); with ``--cpu-overlap`` (the default) the CPU work (the next
        group's model inputs and hole crops, pasting completed holes, submitting matting) runs on a thread while
        the GPU works, as the Ray pipeline's CPU stages run in their own actors (``--no-cpu-overlap``: in line,
        between GPU stages); the wall time from the first image to the last matted layer,
        divided by the number of scenes, is the total. The warm-up
        (excluded) runs the first group and one batch of every sampling side once.

The JSON and the table record the sampling sides (holes per side, ``scenes.completion_sides`` and
``total.completion``) and, from the e2e case, each completion stage's time per hole in each bucket.

Precision: bf16 autocast on CUDA over bf16 weights (``--weights-dtype auto``, the default: as a production
engine serves them; half the weights' memory, and no fp32->bf16 casts of the weights in the steps: the
decomposition benchmark measured 28 steps at 1024 px in 1.05 s over bf16 weights against 1.53 s over fp32 weights
under autocast, though in this script's e2e case, at a transformer batch of 8, an H100 gave only 1%: 4.04 against
4.09 s per image); ``--weights-dtype fp32`` keeps fp32 weights under autocast (the runs before 2026-11-27), fp32 on
the CPU unless ``--weights-dtype bf16`` (CPU bf16 autocast: a dtype-flow check, not a timing); everything under
``torch.inference_mode()``.

Presets: ``full`` (the sizes above; meant for a CUDA GPU, compared with the H100 anchors) and ``tiny`` (a few
hundred thousand parameters per model, 3 scenes at 192 px, 2 steps at sides up to 64 px in buckets of 16 from
32 px: checks the whole script on a CPU in seconds). ``auto`` picks full on CUDA, tiny on the CPU.

Imports only torch, transformers, diffusers, segment_anything, numpy, cv2, scikit-image (through synth) and, in
the matting workers, pymatting/numba/scipy and reflade.engine's synth, config, types and classical_matting
modules: never ray or boto3 (the JSON records any such module found loaded, ``forbidden_modules``). Without an
installed ``reflade`` package the engine modules are imported from this source tree. When pymatting cannot be
imported (numba missing, say) the matting stage is recorded as "unavailable (reason)" and the rest still runs.

    python bench/gpu_engine.py                                  # full preset on the GPU
    python bench/gpu_engine.py --completion-sides fixed         # every crop at 1024 px, for comparison
    python bench/gpu_engine.py --preset tiny --device cpu       # the CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FORBIDDEN = ("ray", "boto3", "botocore")
CASES = (
    "owlv2",
    "sam_encoder",
    "sam_decoder",
    "vae_encode",
    "sd3_transformer",
    "vae_decode",
    "matting",
    "e2e",
)
STAGES = CASES[:-1]
COMPLETION_STAGES = ("vae_encode", "sd3_transformer", "vae_decode")

# ---------------------------------------------------------------- anchors (H100 80GB, full preset)

ANCHORS: dict[str, dict[str, Any]] = {
    "owlv2": {"s": 0.013, "unit": "image", "note": "OWLv2-base at 768 px"},
    "sam_encoder": {"s": 0.057, "unit": "image", "note": "SAM ViT-H encoder, batch 4"},
    "sam_decoder": {"s": 0.006, "unit": "image", "note": "mask decoder, 16 boxes"},
    "vae_encode": {"s": 0.05, "unit": "hole", "note": "SD3 VAE encode, 1024 px"},
    "sd3_transformer": {"s": 0.86, "unit": "hole", "note": "28 SD3-medium steps, 1024 px"},
    "vae_decode": {"s": 0.09, "unit": "hole", "note": "SD3 VAE decode, 1024 px"},
    "matting": {"s": 1.9, "unit": "image", "note": "pymatting 1024 px, one core"},
    "total": {"s": 4.0, "unit": "image", "note": "target end to end"},
}
ANCHOR_STEPS = 28
ANCHOR_SIZE = 1024

# ---------------------------------------------------------------- model configurations

SAM_CONFIGS: dict[str, dict[str, Any]] = {
    # segment_anything.build_sam_vit_h
    "full": {
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
    },
    # "tiny": reflade.engine.backends.tiny_weights.TINY_SAM_CONFIG, added by sam_config() (the engine's modules
    # are importable only after ensure_reflade()).
}

# Owlv2Config keyword arguments; {} = the library defaults, i.e. OWLv2-base/16 at 768 px.
OWL_CONFIGS: dict[str, dict[str, Any]] = {
    "full": {},
    "tiny": {
        "text_config": {
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 62,
            "eos_token_id": 63,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 128,
            "patch_size": 16,
        },
        "projection_dim": 32,
    },
}
OWL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, as Owlv2ImageProcessor
OWL_STD = (0.26862954, 0.26130258, 0.27577711)

SD3_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium transformer/config.json
    "full": {
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
    },
    "tiny": {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "caption_projection_dim": 64,
        "pooled_projection_dim": 64,
        "out_channels": 16,
        "pos_embed_max_size": 16,
    },
}
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium vae/config.json
    "full": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "tiny": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 16, 32, 32),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
}
TEXT_TOKENS = {"full": 333, "tiny": 32}
"""Length of the prompt embeddings: SD3's CLIP-L/G (77) + T5 (256) tokens."""
COMPLETION_PX = {"full": 1024, "tiny": 64}
"""The model's largest sampling side (pixels): every crop's side with --completion-sides fixed, the cap with
bucketed."""
COMPLETION_SIDES = ("bucketed", "fixed")
COMPLETION_SCHEDULES = ("queue", "group")
N_QUERIES = 12
"""Text queries of the detector (EngineConfig's default vocabulary has 12 words)."""
N_BOXES = 16
"""Boxes per image through SAM's mask decoder."""
FLOW_SHIFT = 3.0
"""SD3's flow-matching timestep shift."""
CFG_SCALE = 7.0
DILATE_PX = 4
"""Background hole = visible mask dilated by this (EngineConfig.completion_dilate_px)."""
CONTEXT = 2.0
MIN_CROP_PX = 32
"""A hole's crop is CONTEXT times its larger side, at least MIN_CROP_PX (as the neural completion backend)."""

PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "scenes": 16,
        "size": 1024,
        "steps": 28,
        "batch": 4,
        "sd3_batch": 8,
        "vae_batch": 4,
        "warmup": 2,
        "iters": 5,
        "sd3_iters": 1,
        "matting_workers": max(1, (os.cpu_count() or 2) - 2),
        "bucket_step": 256,
        "min_side": 512,
    },
    "tiny": {
        "scenes": 3,
        "size": 192,
        "steps": 2,
        "batch": 2,
        "sd3_batch": 4,
        "vae_batch": 2,
        "warmup": 1,
        "iters": 2,
        "sd3_iters": 1,
        "matting_workers": 1,
        "bucket_step": 16,
        "min_side": 32,
    },
}


# ---------------------------------------------------------------- small helpers (also used in the workers)


def forbidden_modules() -> list[str]:
    """Loaded modules of the packages this script must not need (ray, boto3, botocore)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)


def ensure_reflade() -> str:
    """Make ``reflade.engine`` importable: the installed package, else this source tree (``engine/``)."""
    try:
        importlib.import_module("reflade.engine.synth")
        return "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "reflade" or m.startswith("reflade.")]:
        del sys.modules[name]
    pkg = types.ModuleType("reflade")
    pkg.__path__ = [str(ROOT)]  # reflade.engine -> ROOT/engine, as [tool.setuptools.package-dir] maps it
    sys.modules["reflade"] = pkg
    importlib.import_module("reflade.engine.synth")
    return f"source tree {ROOT}"


def _resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): area averaging down, bilinear up."""
    if (a.shape[1], a.shape[0]) == size:
        return a
    shrink = size[0] < a.shape[1] or size[1] < a.shape[0]
    return cv2.resize(a, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for what starts inside the block (spawned workers), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- matting workers (spawned processes)

_WORKER: dict[str, Any] = {}


def _matting_init(barrier) -> None:
    """Worker initializer: import the matting backend (numba compiles pymatting here) and run it once.

    Never raises (a raising initializer breaks the whole pool): a failure is kept and reported by every job.
    The barrier holds every worker until all are ready, so the warm-up is over for all once one job returns.
    """
    try:
        cv2.setNumThreads(1)
        ensure_reflade()
        import pymatting  # noqa: F401  (numba: compiled, or loaded from its cache, on first import)

        from reflade.engine.backends.classical_matting import ClassicalMattingBackend
        from reflade.engine.synth import make_scene

        backend = ClassicalMattingBackend()
        _WORKER["backend"] = backend
        scene = make_scene(0, size=(64, 64))  # JIT-compiles whatever is compiled lazily
        _matte_scene(scene.image, [(o.layer, o.visible_mask, o.amodal_mask) for o in scene.objects])
    except BaseException as e:  # noqa: BLE001 - reported, never raised
        _WORKER.pop("backend", None)
        _WORKER["error"] = f"{type(e).__name__}: {e}"
    finally:
        if barrier is not None:
            with contextlib.suppress(Exception):
                barrier.wait(timeout=300)


def _matte_scene(image: np.ndarray, objects: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    from reflade.engine.types import Completion

    backend = _WORKER["backend"]
    alpha_px = 0
    for layer, visible, amodal in objects:
        # The completed layer as stage 3 hands it over: colours inside the amodal mask, alpha 255 there.
        rgba = layer.copy()
        rgba[..., 3] = np.where(amodal, 255, 0).astype(np.uint8)
        rgba[~amodal, :3] = 0
        out = backend.refine(image, Completion(rgba=rgba, amodal_mask=amodal, background=image), visible)
        alpha_px += int(np.count_nonzero(out[..., 3]))
    return alpha_px


def _matting_ping() -> dict[str, Any]:
    return {
        "ok": "backend" in _WORKER,
        "reason": _WORKER.get("error", ""),
        "pid": os.getpid(),
        "forbidden": forbidden_modules(),
    }


def _matting_job(
    image: np.ndarray, objects: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """Matte every entity of one scene; returns its seconds (the layers stay here: Ray would store them)."""
    if "backend" not in _WORKER:
        return {"ok": False, "reason": _WORKER.get("error", "not initialised")}
    t0 = time.perf_counter()
    alpha_px = _matte_scene(image, objects)
    return {
        "ok": True,
        "seconds": time.perf_counter() - t0,
        "layers": len(objects),
        "alpha_px": alpha_px,
        "pid": os.getpid(),
        "forbidden": forbidden_modules(),
    }


class MattingPool:
    """The CPU matting workers: spawned (never forked from a CUDA process), one thread each."""

    def __init__(self, workers: int):
        import multiprocessing

        self.workers = workers
        self.available = False
        self.reason = ""
        self.forbidden: set[str] = set()
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_matting_init, initargs=(ctx.Barrier(workers),)
        )
        one = "1"
        # Workers start inside submit(): these variables reach them, not this process.
        with _env(
            OMP_NUM_THREADS=one,
            MKL_NUM_THREADS=one,
            OPENBLAS_NUM_THREADS=one,
            NUMBA_NUM_THREADS=one,
            CUDA_VISIBLE_DEVICES="",
        ):
            self._pings = [self.pool.submit(_matting_ping) for _ in range(workers)]

    def ready(self) -> bool:
        """Wait for every worker's warm-up; False (with ``reason``) when matting cannot run."""
        try:
            pings = [f.result() for f in self._pings]
        except Exception as e:  # a worker died (BrokenProcessPool)
            self.reason = f"{type(e).__name__}: {e}"
            return False
        for p in pings:
            self.forbidden.update(p["forbidden"])
        bad = [p["reason"] for p in pings if not p["ok"]]
        self.available = not bad
        self.reason = bad[0] if bad else ""
        return self.available

    def submit(self, scene):
        objects = [(o.layer, o.visible_mask, o.amodal_mask) for o in scene.objects]
        return self.pool.submit(_matting_job, scene.image, objects)

    def submit_layers(self, scene) -> list:
        """One job per entity (the Ray pipeline's matting unit is the layer): a scene's layers run in parallel."""
        return [
            self.pool.submit(_matting_job, scene.image, [(o.layer, o.visible_mask, o.amodal_mask)])
            for o in scene.objects
        ]

    def collect(self, result: dict[str, Any]) -> dict[str, Any]:
        if not result.get("ok"):
            raise RuntimeError(f"matting job failed: {result.get('reason')}")
        self.forbidden.update(result.get("forbidden", []))
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- models


def sam_config(preset: str) -> dict[str, Any]:
    """SAM constructor arguments: ViT-H sizes for ``full``, the engine's tiny SAM for ``tiny``."""
    if preset == "tiny":
        ensure_reflade()
        from reflade.engine.backends.tiny_weights import TINY_SAM_CONFIG

        return dict(TINY_SAM_CONFIG)
    return SAM_CONFIGS[preset]


def build_sam(cfg: dict[str, Any]):
    """A ``segment_anything.modeling.Sam`` from constructor arguments, with the engine's own builder."""
    ensure_reflade()
    from reflade.engine.backends.neural import build_sam as engine_build_sam

    return engine_build_sam(cfg).eval()


def side_multiple(preset: str) -> int:
    """What every sampling side of a preset must be a multiple of, pixels: VAE factor x SD3 patch size."""
    ensure_reflade()
    from reflade.engine.backends.neural import unet_side_multiple

    return unet_side_multiple(VAE_CONFIGS[preset]["block_out_channels"]) * SD3_CONFIGS[preset]["patch_size"]


def build_owlv2(preset: str):
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    return Owlv2ForObjectDetection(Owlv2Config(**OWL_CONFIGS[preset])).eval()


def build_sd3_transformer(preset: str):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**SD3_CONFIGS[preset]).eval()


def build_vae(preset: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIGS[preset]).eval()


BUILDERS = {
    "sam": lambda preset: build_sam(sam_config(preset)),
    "owlv2": build_owlv2,
    "sd3_transformer": build_sd3_transformer,
    "vae": build_vae,
}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(preset: str, device, weights_dtype) -> dict[str, Any]:
    """Every model, randomly initialised directly on ``device`` (no CPU copy of 2 B parameters to make)."""
    import torch

    models = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        with torch.device(device):
            model = build(preset)
        # .to() also moves what a legacy constructor left on the CPU (SAM's pixel_mean/std)
        model = model.to(device)
        models[name] = model if weights_dtype == torch.float32 else model.to(weights_dtype)
    return models


# ---------------------------------------------------------------- the engine's neural steps


class Engine:
    """The models and the per-stage steps, shared by the stage cases and the end-to-end run."""

    def __init__(self, args: argparse.Namespace, device, models: dict[str, Any]):
        import torch

        self.args = args
        self.device = device
        self.sam = models["sam"]
        self.owl = models["owlv2"]
        self.transformer = models["sd3_transformer"]
        self.vae = models["vae"]
        self.preset = args.preset
        self.sam_size = int(self.sam.image_encoder.img_size)
        self.owl_size = int(self.owl.config.vision_config.image_size)
        self.px = COMPLETION_PX[self.preset]
        self.tokens = TEXT_TOKENS[self.preset]
        self.pixel_mean = self.sam.pixel_mean.view(-1).float().cpu().numpy()
        self.pixel_std = self.sam.pixel_std.view(-1).float().cpu().numpy()
        self.owl_mean = np.asarray(OWL_MEAN, np.float32)
        self.owl_std = np.asarray(OWL_STD, np.float32)
        self.gen = torch.Generator(device=device).manual_seed(0)
        with torch.inference_mode(), self.autocast():
            self.dense_pe = self.sam.prompt_encoder.get_dense_pe()
            self.queries = self._encode_queries()
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
        self.scheduler = sched
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_shift = float(self.vae.config.shift_factor or 0.0)
        ensure_reflade()
        from reflade.engine.backends.neural import sampling_side, unet_side_multiple

        self._sampling_side = sampling_side
        self.vae_factor = unet_side_multiple(self.vae.config.block_out_channels)
        # every sampling side is a multiple of the VAE factor x the transformer's patch (16 for SD3)
        self.side_multiple = self.vae_factor * int(self.transformer.config.patch_size)

    def side_for(self, crop_px: int) -> int:
        """Sampling side (pixels) of a crop whose larger side is ``crop_px``, as ``--completion-sides`` says."""
        if self.args.completion_sides == "fixed":
            return self.px
        return self._sampling_side(
            crop_px,
            max_side=self.px,
            step=self.args.bucket_step,
            min_side=self.args.min_side,
            multiple=self.side_multiple,
        )

    def autocast(self):
        import torch

        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.args.weights_dtype == "bf16":  # bf16 weights on the CPU: a check of the dtype flow only
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------ detector
    def _encode_queries(self):
        """Text embeddings of N_QUERIES queries from random ids (no tokenizer): (Q, projection_dim)."""
        import torch

        tc = self.owl.config.text_config
        length = int(tc.max_position_embeddings)
        eos = int(tc.eos_token_id) if tc.eos_token_id is not None else int(tc.vocab_size) - 1
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, min(eos, int(tc.vocab_size) - 1), (N_QUERIES, length), generator=g)
        ids[:, -1] = eos  # OWL pools at the end-of-text token (the argmax id)
        ids = ids.to(self.device)
        out = self.owl.owlv2.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
        embeds = out.pooler_output if hasattr(out, "pooler_output") else out
        return embeds.float()

    def owl_input(self, image: np.ndarray) -> np.ndarray:
        """OWLv2's preprocessing: pad bottom/right to a square with grey, resize, normalise (3xSxS float32)."""
        h, w = image.shape[:2]
        side = max(h, w)
        square = np.full((side, side, 3), 128, np.uint8)
        square[:h, :w] = image
        x = _resize(square, (self.owl_size, self.owl_size)).astype(np.float32) / 255.0
        return ((x - self.owl_mean) / self.owl_std).transpose(2, 0, 1)

    def detect(self, pixels):
        """The N_BOXES best boxes of each image, (B, N_BOXES, 4) xyxy as fractions of the padded square."""
        import torch

        feature_map, _ = self.owl.image_embedder(pixel_values=pixels)
        b, ph, pw, d = feature_map.shape
        feats = feature_map.reshape(b, ph * pw, d)
        queries = self.queries[None].expand(b, -1, -1).to(feats.dtype)
        logits, _ = self.owl.class_predictor(feats, queries, None)
        boxes = self.owl.box_predictor(feats, feature_map).float()
        best = logits.float().amax(-1)
        idx = best.topk(min(N_BOXES, best.shape[1]), dim=1).indices
        sel = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4))
        cx, cy, bw, bh = sel.unbind(-1)
        return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).clamp(0, 1)

    # ------------------------------------------------------------ SAM
    def sam_input(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        size = self.sam_size
        h, w = image.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
        x = _resize(image, (nw, nh)).astype(np.float32)
        out = np.zeros((3, size, size), np.float32)  # zero padding after normalisation, as Sam.preprocess
        out[:, :nh, :nw] = ((x - self.pixel_mean) / self.pixel_std).transpose(2, 0, 1)
        return out, (nh, nw)

    def encode_images(self, pixels):
        return self.sam.image_encoder(pixels)

    def decode_masks(self, embedding, boxes_px, input_hw=None, image_hw=None):
        """SAM's prompt encoder + mask decoder for one image's boxes; with sizes, full-resolution bool masks
        on the CPU (N, H, W), else the low-resolution logits on the device."""
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes_px, masks=None)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        if input_hw is None:
            return low_res
        logits = self.sam.postprocess_masks(low_res.float(), input_hw, image_hw)
        return (logits[:, 0] > self.sam.mask_threshold).cpu().numpy()

    # ------------------------------------------------------------ completion
    def vae_encode(self, pixels):
        """(N, 3, S, S) in [-1, 1] -> scaled latents (N, C, S/8, S/8), in chunks of --vae-batch."""
        import torch

        out = []
        for i in range(0, len(pixels), self.args.vae_batch):
            dist = self.vae.encode(pixels[i : i + self.args.vae_batch]).latent_dist
            out.append((dist.sample(generator=self.gen).float() - self.vae_shift) * self.vae_scale)
        return torch.cat(out)

    def vae_decode(self, latents):
        """Scaled latents -> (N, S, S, 3) uint8 on the device, in chunks of --vae-batch."""
        import torch

        out = []
        for i in range(0, len(latents), self.args.vae_batch):
            z = latents[i : i + self.args.vae_batch] / self.vae_scale + self.vae_shift
            x = self.vae.decode(z).sample.float()
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
        return torch.cat(out)

    def prompt(self, n: int):
        import torch

        cfg = SD3_CONFIGS[self.preset]
        shape = (n, self.tokens, cfg["joint_attention_dim"])
        embeds = torch.randn(shape, generator=self.gen, device=self.device)
        pooled = torch.randn((n, cfg["pooled_projection_dim"]), generator=self.gen, device=self.device)
        return embeds, pooled

    def sample(self, x0, hole, steps: int):
        """Flow-matching Euler inpainting: ``steps`` transformer calls on latents ``x0`` (N, C, h, w); ``hole``
        (N, 1, h, w) is 1 where the sample is generated and 0 where the known latent, re-noised to the current
        noise level, is kept."""
        import torch

        n = len(x0)
        self.scheduler.set_timesteps(steps, device=self.device)
        timesteps = self.scheduler.timesteps.float()
        sigmas = self.scheduler.sigmas.float()
        embeds, pooled = self.prompt(n)
        if self.args.cfg:  # unconditional half first, as the SD3 pipeline
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        x = noise.clone()
        for i in range(steps):
            inp = torch.cat([x, x]) if self.args.cfg else x
            t = timesteps[i].expand(len(inp))
            v = self.transformer(
                hidden_states=inp,
                timestep=t,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0].float()
            if self.args.cfg:
                v_uncond, v_text = v.chunk(2)
                v = v_uncond + CFG_SCALE * (v_text - v_uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            known = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise
            x = hole * x + (1 - hole) * known
        return x

    def complete_by_side(
        self,
        crops: list[np.ndarray],
        holes: list[np.ndarray],
        steps: int,
        timings: dict[str, float] | None = None,
        per_side: dict[int, dict[str, float]] | None = None,
    ) -> list[np.ndarray]:
        """Inpaint crops of several sides: crops (S_i, S_i, 3) uint8 inside holes (S_i, S_i) bool -> samples
        (S_i, S_i, 3) uint8 on the CPU, in the input order. Crops of one side (a bucket) go through
        :meth:`complete` together, smallest side first; ``timings`` gets each stage's seconds, ``per_side`` each
        bucket's holes and stage seconds."""
        by_side: dict[int, list[int]] = {}
        for i, crop in enumerate(crops):
            by_side.setdefault(int(crop.shape[0]), []).append(i)
        out: list[np.ndarray | None] = [None] * len(crops)
        for side, idx in sorted(by_side.items()):
            lap: dict[str, float] | None = None if timings is None else {}
            samples = self.complete(
                np.stack([crops[i] for i in idx]), np.stack([holes[i] for i in idx]), steps, lap
            )
            for i, sample in zip(idx, samples, strict=True):
                out[i] = sample
            if lap is not None:
                for key, seconds in lap.items():
                    timings[key] = timings.get(key, 0.0) + seconds
                if per_side is not None:
                    bucket = per_side.setdefault(side, {"holes": 0})
                    bucket["holes"] += len(idx)
                    for key, seconds in lap.items():
                        bucket[key] = bucket.get(key, 0.0) + seconds
        return out

    def complete(
        self, crops: np.ndarray, holes: np.ndarray, steps: int, timings: dict[str, float] | None = None
    ):
        """Inpaint crops (N, S, S, 3) uint8 inside holes (N, S, S) bool -> (N, S, S, 3) uint8 on the CPU, in
        transformer batches of --sd3-batch."""
        import torch
        import torch.nn.functional as F

        out = []
        for i in range(0, len(crops), self.args.sd3_batch):
            t = time.perf_counter()
            pixels = torch.from_numpy(crops[i : i + self.args.sd3_batch]).to(self.device)
            pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            mask = torch.from_numpy(holes[i : i + self.args.sd3_batch]).to(self.device)[:, None].float()
            x0 = self.vae_encode(pixels)
            hole = (F.interpolate(mask, size=x0.shape[-2:], mode="area") > 0).float()
            t = self._lap(timings, "vae_encode", t)
            x = self.sample(x0, hole, steps)
            t = self._lap(timings, "sd3_transformer", t)
            out.append(self.vae_decode(x).cpu().numpy())
            self._lap(timings, "vae_decode", t)
        return np.concatenate(out)

    def _lap(self, timings, key: str, t0: float) -> float:
        if timings is None:
            return t0
        self.sync()
        now = time.perf_counter()
        timings[key] = timings.get(key, 0.0) + now - t0
        return now


# ---------------------------------------------------------------- holes (as the neural completion backend)


def scene_holes(scene, override: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Holes of one scene: per entity its visible mask dilated (background) and, when occluded, its hidden part
    (amodal, from the ground truth). ``override`` repeats or truncates the list to that many."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * DILATE_PX + 1,) * 2)
    holes = []
    for o in scene.objects:
        if not o.visible_mask.any():
            continue
        holes.append(("background", cv2.dilate(o.visible_mask.astype(np.uint8), kernel).astype(bool)))
        hidden = o.amodal_mask & ~o.visible_mask
        if hidden.any():
            holes.append(("amodal", hidden))
    if override is not None and holes:
        holes = [holes[i % len(holes)] for i in range(override)]
    return holes


def hole_crop(hole: np.ndarray) -> tuple[int, int, int, int]:
    """Crop box (x0, y0, x1, y1) of a hole (HxW bool): a square of CONTEXT x the hole's larger side, at least
    MIN_CROP_PX, centred on the hole and clipped to the image."""
    h, w = hole.shape
    x, y, bw, bh = cv2.boundingRect(hole.astype(np.uint8))
    side = max(MIN_CROP_PX, int(math.ceil(CONTEXT * max(bw, bh))))
    cw, ch = min(side, w), min(side, h)
    cx0 = int(np.clip(x + bw / 2 - cw / 2, 0, w - cw))
    cy0 = int(np.clip(y + bh / 2 - ch / 2, 0, h - ch))
    return cx0, cy0, cx0 + cw, cy0 + ch


def crop_side(box: tuple[int, int, int, int]) -> int:
    """The larger side of a crop box (x0, y0, x1, y1), pixels."""
    return max(box[2] - box[0], box[3] - box[1])


def prepare_holes(image: np.ndarray, holes: list[tuple[str, np.ndarray]], side_for: Callable[[int], int]):
    """One image's holes as the sampler takes them: (crops [(S, S, 3) uint8], hole masks [(S, S) bool], crop
    boxes), each crop resized to its sampling side S = ``side_for(crop's larger side)``."""
    crops, masks, boxes = [], [], []
    for _, hole in holes:
        x0, y0, x1, y1 = box = hole_crop(hole)
        s = side_for(crop_side(box))
        crops.append(_resize(image[y0:y1, x0:x1], (s, s)))
        masks.append(_resize(hole[y0:y1, x0:x1].astype(np.float32), (s, s)) > 0)
        boxes.append(box)
    return crops, masks, boxes


def paste(target: np.ndarray, sample: np.ndarray, hole: np.ndarray, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    inside = hole[y0:y1, x0:x1]
    target[y0:y1, x0:x1][inside] = _resize(sample, (x1 - x0, y1 - y0))[inside]


# ---------------------------------------------------------------- benchmark driver


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.result: dict[str, Any] = {
            "benchmark": "gpu_engine",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "preset": args.preset,
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "anchors": {"hardware": "H100 80GB", **ANCHORS},
            "stages": {},
            "errors": {},
            "complete": False,
        }

    def save(self) -> None:
        self.result["forbidden_modules"] = sorted(set(forbidden_modules()) | self._worker_forbidden())
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=_json_default) + "\n")
        os.replace(tmp, self.out)

    def _worker_forbidden(self) -> set[str]:
        pool = getattr(self, "pool", None)
        return set(pool.forbidden) if pool is not None else set()

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        args = self.args
        self.device = torch.device(args.device)
        self.reflade_from = ensure_reflade()
        from reflade.engine.synth import make_scene

        self.pool = (
            MattingPool(args.matting_workers) if args.matting_workers > 0 and self._wants_matting() else None
        )

        t = time.perf_counter()
        self.scenes = [make_scene(seed, size=(args.size, args.size)) for seed in range(args.scenes)]
        self.holes = [scene_holes(s, args.holes) for s in self.scenes]
        scene_s = time.perf_counter() - t

        # This process's intra-op threads take the cores the matting workers leave (OpenMP's spinning barriers
        # collapse when they share cores with the workers).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.matting_workers))
        self.result["torch_threads"] = torch.get_num_threads()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        dtype = torch.bfloat16 if args.weights_dtype == "bf16" else torch.float32
        t = time.perf_counter()
        models = build_models(args.preset, self.device, dtype)
        self.engine = Engine(args, self.device, models)
        self.engine.sync()
        build_s = time.perf_counter() - t

        self.result["device"] = device_info(self.device)
        self.result["versions"] = versions()
        self.result["reflade_engine_from"] = self.reflade_from
        self.result["models"] = {
            name: {
                "params": count_params(m),
                "weights_gb": round(sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30, 3),
            }
            for name, m in models.items()
        }
        self.result["models"]["owlv2"]["attn_implementation"] = getattr(
            models["owlv2"].config, "_attn_implementation", None
        )
        n_holes = [len(h) for h in self.holes]
        self.holes_per_image = statistics.fmean(n_holes) if n_holes else 0.0
        self.result["scenes"] = {
            "count": len(self.scenes),
            "size": args.size,
            "objects_per_image": statistics.fmean(len(s.objects) for s in self.scenes),
            "holes_per_image": self.holes_per_image,
            "holes": n_holes,
            "made_in_s": round(scene_s, 3),
        }
        self.result["setup_s"] = {"scenes": round(scene_s, 3), "models": round(build_s, 3)}
        # The sides follow from the scenes' holes alone (no timing): the distribution the e2e case samples.
        self.sides = [[self.engine.side_for(crop_side(hole_crop(h))) for _, h in hs] for hs in self.holes]
        self.result["scenes"]["completion_sides"] = _count_sides(s for hs in self.sides for s in hs)
        self.result["completion"] = self.completion_config()
        self.result["input_sizes"] = {
            "owlv2_px": self.engine.owl_size,
            "sam_px": self.engine.sam_size,
            "completion_px": self.engine.px,
            "latent": [SD3_CONFIGS[args.preset]["in_channels"]]
            + [self.engine.px // self.engine.vae_factor] * 2,
            "text_tokens": self.engine.tokens,
        }
        t = time.perf_counter()
        self.matting_ok = False
        self.matting_reason = (
            "disabled (--matting-workers 0)"
            if args.matting_workers <= 0
            else "not run (no matting or e2e case)"
        )
        if self.pool is not None:
            self.matting_ok = self.pool.ready()
            self.matting_reason = "" if self.matting_ok else f"unavailable ({self.pool.reason})"
        self.result["setup_s"]["matting_workers_ready"] = round(time.perf_counter() - t, 3)
        self.result["matting"] = {
            "available": self.matting_ok,
            "workers": args.matting_workers,
            "reason": self.matting_reason,
        }
        if self.pool is not None and not self.matting_ok:
            print(f"matting: {self.matting_reason}", flush=True)
        self.save()

    def completion_config(self) -> dict[str, Any]:
        """How sampling sides are chosen (``--completion-sides`` and its parameters), for the JSON."""
        a, e = self.args, self.engine
        if a.completion_sides == "fixed":
            return {
                "mode": "fixed",
                "schedule": a.completion_schedule,
                "side": e.px,
                "max_side": e.px,
                "side_multiple": e.side_multiple,
            }
        return {
            "mode": "bucketed",
            "schedule": a.completion_schedule,
            "bucket_step": a.bucket_step,
            "min_side": a.min_side,
            "max_side": e.px,
            "side_multiple": e.side_multiple,
        }

    def _wants_matting(self) -> bool:
        return "matting" in self.args.cases or "e2e" in self.args.cases

    # ------------------------------------------------------------ timing helpers
    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        import torch

        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)

    def timed(self, fn, warmup: int, iters: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            self.engine.sync()
            t0 = time.perf_counter()
            fn()
            self.engine.sync()
            times.append(time.perf_counter() - t0)
        return times

    def record(
        self, stage: str, times: list[float], per_call_units: int, unit: str, units_per_image: float, **extra
    ):
        per_call = statistics.median(times)
        per_unit = per_call / per_call_units
        entry = {
            "unit": unit,
            "units_per_call": per_call_units,
            "s_per_call": per_call,
            "s_per_call_all": times,
            "s_per_unit": per_unit,
            "units_per_image": units_per_image,
            "s_per_image": per_unit * units_per_image,
            "anchor_s_per_unit": self.anchor(stage),
            "peak_mem_gb": self.peak_gb(),
            **extra,
        }
        self.result["stages"][stage] = entry
        return entry

    def anchor(self, stage: str) -> float:
        a = ANCHORS[stage]["s"]
        if stage == "sd3_transformer":
            a *= self.args.steps / ANCHOR_STEPS * (2 if self.args.cfg else 1)
        return a

    # ------------------------------------------------------------ inputs
    def images(self, n: int) -> list[np.ndarray]:
        return [self.scenes[i % len(self.scenes)].image for i in range(n)]

    def hole_batch(self, n: int, side: int | None = None):
        """``n`` crops (n, S, S, 3) uint8 and hole masks (n, S, S) bool from the scenes' holes (repeated when
        there are fewer), all at S = ``side`` (default: the model's full side, as the per-stage cases measure);
        with a side, only the holes sampled at that side in the e2e case."""
        px = self.engine.px if side is None else side
        crops, masks = [], []
        for i, scene in enumerate(self.scenes):
            holes = [
                h for h, s in zip(self.holes[i], self.sides[i], strict=True) if side is None or s == side
            ]
            if holes:
                c, m, _ = prepare_holes(scene.image, holes, lambda _: px)
                crops += c
                masks += m
            if len(crops) >= n:
                break
        idx = [i % len(crops) for i in range(n)]
        return np.stack([crops[i] for i in idx]), np.stack([masks[i] for i in idx])

    def pixels(self, crops: np.ndarray):
        import torch

        x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0

    # ------------------------------------------------------------ cases
    def case_owlv2(self):
        import torch

        e, a = self.engine, self.args
        px = torch.from_numpy(np.stack([e.owl_input(im) for im in self.images(a.batch)])).to(self.device)
        times = self.timed(lambda: e.detect(px), a.warmup, a.iters)
        return self.record("owlv2", times, a.batch, "image", 1, batch=a.batch, input_px=e.owl_size)

    def case_sam_encoder(self):
        import torch

        e, a = self.engine, self.args
        px = torch.from_numpy(np.stack([e.sam_input(im)[0] for im in self.images(a.batch)])).to(self.device)
        times = self.timed(lambda: e.encode_images(px), a.warmup, a.iters)
        return self.record("sam_encoder", times, a.batch, "image", 1, batch=a.batch, input_px=e.sam_size)

    def case_sam_decoder(self):
        import torch

        e, a = self.engine, self.args
        image = self.images(1)[0]
        x, input_hw = e.sam_input(image)
        emb = e.encode_images(torch.from_numpy(x[None]).to(self.device))
        g = torch.Generator().manual_seed(2)
        xy = torch.rand((N_BOXES, 2), generator=g) * 0.7
        wh = 0.1 + torch.rand((N_BOXES, 2), generator=g) * 0.2
        boxes = (torch.cat([xy, xy + wh], -1) * e.sam_size).to(self.device)
        times = self.timed(lambda: e.decode_masks(emb, boxes), a.warmup, a.iters)
        full = self.timed(lambda: e.decode_masks(emb, boxes, input_hw, image.shape[:2]), 1, a.iters)
        return self.record(
            "sam_decoder",
            times,
            1,
            "image",
            1,
            boxes=N_BOXES,
            s_per_image_with_masks_on_cpu=statistics.median(full),
        )

    def case_vae_encode(self):
        e, a = self.engine, self.args
        crops, _ = self.hole_batch(a.vae_batch)
        px = self.pixels(crops)
        times = self.timed(lambda: e.vae_encode(px), a.warmup, a.iters)
        return self.record(
            "vae_encode", times, a.vae_batch, "hole", self.holes_per_image, batch=a.vae_batch, input_px=e.px
        )

    def case_sd3_transformer(self):
        import torch
        import torch.nn.functional as F

        e, a = self.engine, self.args
        crops, holes = self.hole_batch(a.sd3_batch)
        x0 = e.vae_encode(self.pixels(crops))
        mask = torch.from_numpy(holes).to(self.device)[:, None].float()
        hole = (F.interpolate(mask, size=x0.shape[-2:], mode="area") > 0).float()
        e.sample(x0, hole, min(2, a.steps))  # warm-up: a couple of steps compile/plan every kernel
        times = self.timed(lambda: e.sample(x0, hole, a.steps), 0, a.sd3_iters)
        return self.record(
            "sd3_transformer",
            times,
            a.sd3_batch,
            "hole",
            self.holes_per_image,
            batch=a.sd3_batch,
            steps=a.steps,
            cfg=a.cfg,
            s_per_step_per_hole=statistics.median(times) / a.steps / a.sd3_batch,
            latent=list(x0.shape[1:]),
        )

    def case_vae_decode(self):
        e, a = self.engine, self.args
        crops, _ = self.hole_batch(a.vae_batch)
        z = e.vae_encode(self.pixels(crops))
        times = self.timed(lambda: e.vae_decode(z), a.warmup, a.iters)
        return self.record(
            "vae_decode", times, a.vae_batch, "hole", self.holes_per_image, batch=a.vae_batch, input_px=e.px
        )

    def case_matting(self):
        a = self.args
        if not self.matting_ok:
            entry = {
                "available": False,
                "reason": self.matting_reason,
                "unit": "image",
                "s_per_image": None,
                "anchor_s_per_unit": self.anchor("matting"),
            }
            self.result["stages"]["matting"] = entry
            return entry
        n = min(len(self.scenes), max(a.matting_workers, 2))
        t0 = time.perf_counter()
        results = [self.pool.collect(f.result()) for f in [self.pool.submit(s) for s in self.scenes[:n]]]
        wall = time.perf_counter() - t0
        per_image = [r["seconds"] for r in results]
        entry = self.record("matting", per_image, 1, "image", 1, workers=a.matting_workers, images=n)
        entry.update(
            available=True,
            s_per_image_one_core=entry["s_per_image"],
            layers_per_image=statistics.fmean(r["layers"] for r in results),
            throughput_s_per_image=wall / n,
            peak_mem_gb=None,
        )
        return entry

    def case_e2e(self):
        import torch

        a, e = self.args, self.engine
        # Warm-up with one step (excluded): the first group, then one batch of every sampling side, so that
        # every kernel and shape class has run once.
        with torch.inference_mode(), e.autocast():
            self._e2e_pass(self.scenes[: a.batch], self.holes[: a.batch], 1, matting=False)
            for side in sorted({s for ss in self.sides for s in ss}):
                crops, masks = self.hole_batch(a.sd3_batch, side)
                e.complete(crops, masks, 1)
        self.reset_peak()
        with torch.inference_mode(), self.engine.autocast():
            res = self._e2e_pass(self.scenes, self.holes, a.steps, matting=self.matting_ok)
        n = len(self.scenes)
        total = {
            "s_per_image": res["wall_s"] / n,
            "wall_s": res["wall_s"],
            "scenes": n,
            "size": a.size,
            "batch": a.batch,
            "holes": res["holes"],
            "matting": "overlapped" if self.matting_ok else self.matting_reason,
            "matting_unit": a.matting_unit,
            "matting_workers": a.matting_workers,
            "completion": {
                **self.completion_config(),
                "holes_per_side": {str(side): b["holes"] for side, b in sorted(res["per_side"].items())},
                "per_side": {str(side): _bucket_entry(b) for side, b in sorted(res["per_side"].items())},
            },
            "breakdown_s": res["breakdown"],
            "breakdown_s_per_image": {k: v / n for k, v in res["breakdown"].items()},
            "cpu_overlap": a.cpu_overlap,
            "cpu_overlapped_s_per_image": {k: v / n for k, v in res["cpu_overlapped"].items()},
            "gpu_done_s": res["gpu_done_s"],
            "matting_tail_s": res["wall_s"] - res["gpu_done_s"],
            "matting_job_s": res["matting_job_s"],
            "peak_mem_gb": self.peak_gb(),
            "target_s_per_image": ANCHORS["total"]["s"],
        }
        self.result["total"] = total
        return total

    def _e2e_pass(self, scenes, holes_list, steps: int, matting: bool) -> dict[str, Any]:
        import torch

        e, a = self.engine, self.args
        bd: dict[str, float] = {}
        cpu_bg: dict[str, float] = {}  # seconds the CPU thread spent (overlapped, not on the GPU's path)
        per_side: dict[int, dict[str, float]] = {}
        futures: list = []  # matting futures
        pastes: list = []  # CPU-thread jobs: (matting futures, seconds) of the scenes they pasted
        queues: dict[int, list[tuple[dict[str, Any], int, np.ndarray, np.ndarray]]] = {}
        n_holes = 0
        groups = [
            (scenes[g : g + a.batch], holes_list[g : g + a.batch]) for g in range(0, len(scenes), a.batch)
        ]
        cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-cpu") if a.cpu_overlap else None

        def prep(group, group_holes):
            t0 = time.perf_counter()
            owl = np.stack([e.owl_input(s.image) for s in group])
            sam_in = [e.sam_input(s.image) for s in group]
            sam = np.stack([x for x, _ in sam_in])
            prepared = [
                prepare_holes(s.image, hs, e.side_for) if hs else None
                for s, hs in zip(group, group_holes, strict=True)
            ]
            return owl, sam_in, sam, prepared, time.perf_counter() - t0

        def later(fn, *args) -> Future:
            """On the CPU thread with --cpu-overlap, else here and now (a finished future)."""
            if cpu is not None:
                return cpu.submit(fn, *args)
            done: Future = Future()
            done.set_result(fn(*args))
            return done

        e.sync()
        start = time.perf_counter()
        pending = later(prep, *groups[0])
        if cpu is None:
            e._lap(bd, "cpu_prep", start)
        for i, (group, group_holes) in enumerate(groups):
            t = time.perf_counter()
            owl, sam_in, sam, prepared, prep_s = pending.result()
            # The next group's CPU work runs on the thread while this group is on the GPU.
            if i + 1 < len(groups):
                pending = later(prep, *groups[i + 1])
            if cpu is not None:
                cpu_bg["cpu_prep"] = cpu_bg.get("cpu_prep", 0.0) + prep_s
            owl_px = torch.from_numpy(owl).to(self.device)
            sam_px = torch.from_numpy(sam).to(self.device)
            t = e._lap(bd, "cpu_prep" if cpu is None else "cpu_wait", t)
            boxes = e.detect(owl_px)
            t = e._lap(bd, "owlv2", t)
            emb = e.encode_images(sam_px)
            t = e._lap(bd, "sam_encoder", t)
            masks = []
            for k, s in enumerate(group):
                # OWL boxes are fractions of the padded square; SAM's input is that square at sam_size.
                masks.append(
                    e.decode_masks(emb[k : k + 1], boxes[k] * e.sam_size, sam_in[k][1], s.image.shape[:2])
                )
            t = e._lap(bd, "sam_decoder", t)
            if a.completion_schedule == "queue":
                # Holes wait in one queue per sampling side, across groups; a side runs as soon as it holds a
                # full transformer batch, the rest after the last group. A scene is pasted and goes to matting
                # when its last hole is done.
                for s, hs, p in zip(group, group_holes, prepared, strict=True):
                    if p is None:
                        if matting:
                            futures += self._matte(s)
                        continue
                    state = {
                        "scene": s,
                        "holes": hs,
                        "boxes": p[2],
                        "samples": [None] * len(hs),
                        "left": len(hs),
                    }
                    for k, (crop, hmask) in enumerate(zip(p[0], p[1], strict=True)):
                        queues.setdefault(int(crop.shape[0]), []).append((state, k, crop, hmask))
                    n_holes += len(hs)
                for side in sorted(queues):
                    while len(queues[side]) >= a.sd3_batch:
                        batch, queues[side] = queues[side][: a.sd3_batch], queues[side][a.sd3_batch :]
                        pastes.append(self._complete_queued(batch, steps, bd, per_side, matting, later))
                continue
            todo = [p for p in prepared if p is not None]
            if todo:
                crops = [c for p in todo for c in p[0]]
                hmask = [m for p in todo for m in p[1]]
                n_holes += len(crops)
                samples = e.complete_by_side(crops, hmask, steps, bd, per_side)
                finished, k0 = [], 0
                for s, hs, p in zip(group, group_holes, prepared, strict=True):
                    if p is not None:
                        finished.append((s, hs, p[2], samples[k0 : k0 + len(hs)]))
                        k0 += len(hs)
                pastes.append(later(self._paste_and_matte, finished, matting))
            if matting:
                futures += [
                    f for s, p in zip(group, prepared, strict=True) if p is None for f in self._matte(s)
                ]
        for side in sorted(queues):  # the partial batches left after the last group
            for i in range(0, len(queues[side]), a.sd3_batch):
                pastes.append(
                    self._complete_queued(
                        queues[side][i : i + a.sd3_batch], steps, bd, per_side, matting, later
                    )
                )
        e.sync()
        gpu_done = time.perf_counter() - start
        for job in pastes:
            more, paste_s = job.result()
            futures += more
            into = bd if cpu is None else cpu_bg
            into["cpu_paste"] = into.get("cpu_paste", 0.0) + paste_s
        results = [self.pool.collect(f.result()) for f in futures]
        wall = time.perf_counter() - start
        if cpu is not None:
            cpu.shutdown(wait=True)
        return {
            "wall_s": wall,
            "gpu_done_s": gpu_done,
            "breakdown": bd,
            "cpu_overlapped": cpu_bg,
            "per_side": per_side,
            "holes": n_holes,
            "matting_job_s": [r["seconds"] for r in results],
        }

    def _paste_and_matte(self, finished, matting: bool) -> tuple[list, float]:
        """Paste each finished scene's completed holes (its background and amodal layer images) and submit its
        matting; returns (matting futures, seconds). Runs on the CPU thread with --cpu-overlap."""
        t0 = time.perf_counter()
        futures = []
        for scene, holes, boxes, samples in finished:
            background, layer = scene.image.copy(), scene.image.copy()
            for (kind, hole), box, sample in zip(holes, boxes, samples, strict=True):
                paste(background if kind == "background" else layer, sample, hole, box)
            if matting:
                futures += self._matte(scene)
        return futures, time.perf_counter() - t0

    def _matte(self, scene) -> list:
        """Matting futures of one scene: one per layer (``--matting-unit layer``) or one for the scene."""
        if self.args.matting_unit == "layer":
            return self.pool.submit_layers(scene)
        return [self.pool.submit(scene)]

    def _complete_queued(self, batch, steps: int, bd, per_side, matting: bool, later) -> Future:
        """One transformer batch of queued holes (all of one side); the scenes it finishes go to
        ``_paste_and_matte`` through ``later`` (the CPU thread with --cpu-overlap)."""
        e = self.engine
        lap: dict[str, float] = {}
        samples = e.complete(
            np.stack([c for _, _, c, _ in batch]), np.stack([m for _, _, _, m in batch]), steps, lap
        )
        side = int(batch[0][2].shape[0])
        bucket = per_side.setdefault(side, {"holes": 0})
        bucket["holes"] += len(batch)
        for key, seconds in lap.items():
            bd[key] = bd.get(key, 0.0) + seconds
            bucket[key] = bucket.get(key, 0.0) + seconds
        finished = []
        for (state, k, _, _), sample in zip(batch, samples, strict=True):
            state["samples"][k] = sample
            state["left"] -= 1
            if state["left"] == 0:
                finished.append((state["scene"], state["holes"], state["boxes"], state["samples"]))
        return later(self._paste_and_matte, finished, matting)

    # ------------------------------------------------------------ run
    def run(self) -> int:
        import torch

        failed = 0
        try:
            self.setup()
        except Exception as e:
            self.result["errors"]["setup"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            self.save()
            self.close()
            return 2
        for case in self.args.cases:
            self.reset_peak()
            t0 = time.perf_counter()
            try:
                with torch.inference_mode(), self.engine.autocast():
                    entry = getattr(self, f"case_{case}")()
            except Exception as e:  # an OOM in one case must not lose the others
                failed += 1
                msg = f"{type(e).__name__}: {e}"
                self.result["errors"][case] = msg
                print(f"{case}: FAILED {msg}", flush=True)
                traceback.print_exc()  # the next case's reset_peak() empties the CUDA cache
            else:
                print(_case_line(case, entry, time.perf_counter() - t0), flush=True)
            self.save()
        self.result["complete"] = failed == 0
        self.save()
        self.close()
        print_table(self.result, self.args)
        print(f"\nwrote {self.out}")
        return 1 if failed else 0

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()


# ---------------------------------------------------------------- reporting


def _count_sides(sides) -> dict[str, int]:
    """Holes per sampling side, smallest side first (JSON keys are strings)."""
    counts: dict[int, int] = {}
    for s in sides:
        counts[s] = counts.get(s, 0) + 1
    return {str(s): counts[s] for s in sorted(counts)}


def _bucket_entry(bucket: dict[str, float]) -> dict[str, Any]:
    """One sampling side's e2e figures: holes, and each completion stage's seconds in all and per hole."""
    n = int(bucket["holes"])
    entry: dict[str, Any] = {"holes": n}
    for stage in COMPLETION_STAGES:
        entry[f"{stage}_s"] = bucket.get(stage, 0.0)
        entry[f"{stage}_s_per_hole"] = bucket.get(stage, 0.0) / n
    entry["s_per_hole"] = sum(entry[f"{stage}_s_per_hole"] for stage in COMPLETION_STAGES)
    return entry


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | tuple):
        return list(o)
    return str(o)


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"type": device.type, "torch": torch.__version__, "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gb=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info.update(name=name, threads=torch.get_num_threads())
    return info


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "opencv": cv2.__version__}
    for dist in ("torch", "transformers", "diffusers", "segment-anything", "numpy", "scikit-image", "scipy",
                 "pymatting", "numba"):  # fmt: skip
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _fmt(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _case_line(case: str, entry: dict[str, Any] | None, wall: float) -> str:
    if case == "matting" and not entry.get("available"):
        return f"matting: {entry['reason']}"
    if case == "e2e":
        return f"e2e: {_fmt(entry['s_per_image'])} per image over {entry['scenes']} scenes ({wall:.1f} s)"
    return (
        f"{case}: {_fmt(entry['s_per_unit'])} per {entry['unit']}, {_fmt(entry['s_per_image'])} per image "
        f"(case {wall:.1f} s)"
    )


def print_table(result: dict[str, Any], args: argparse.Namespace) -> None:
    dev = result.get("device", {})
    comparable = (
        args.preset == "full"
        and dev.get("type") == "cuda"
        and args.size == ANCHOR_SIZE
        and args.steps == ANCHOR_STEPS
    )
    print(f"\n{dev.get('name', '?')} | torch {dev.get('torch', '?')} | preset {args.preset} | "
          f"{result.get('scenes', {}).get('count', '?')} scenes at {args.size} px | "
          f"{result.get('scenes', {}).get('holes_per_image', 0):.2f} holes per image")  # fmt: skip
    if not comparable:
        print(
            "(anchors are H100 figures for the full preset at 1024 px and 28 steps: not comparable with this run)"
        )
    head = f"{'stage':<16} {'unit':<6} {'measured':>11} {'anchor':>11} {'ratio':>7} {'per image':>11} {'peak GB':>8}"
    if result.get("completion", {}).get("mode") == "bucketed":
        print("(vae_encode, sd3_transformer and vae_decode rows: every hole at the full side, as the anchors; "
              "e2e: bucketed sides)")  # fmt: skip
    print(head)
    print("-" * len(head))
    stages = result.get("stages", {})
    gpu_sum = 0.0
    for name in STAGES:
        entry = stages.get(name)
        anchor = ANCHORS[name]
        if entry is None:
            err = result.get("errors", {}).get(name)
            print(f"{name:<16} {anchor['unit']:<6} {'FAILED: ' + err if err else 'not run'}")
            continue
        if name == "matting" and not entry.get("available", True):
            print(f"{name:<16} {'image':<6} unavailable ({entry.get('reason', '')})")
            continue
        a = entry["anchor_s_per_unit"]
        ratio = f"{entry['s_per_unit'] / a:.2f}x" if a else "-"
        peak = f"{entry['peak_mem_gb']:.1f}" if entry.get("peak_mem_gb") is not None else "-"
        label = name + (" (1 core)" if name == "matting" else "")
        print(f"{label:<16} {entry['unit']:<6} {_fmt(entry['s_per_unit']):>11} {_fmt(a):>11} {ratio:>7} "
              f"{_fmt(entry['s_per_image']):>11} {peak:>8}")  # fmt: skip
        if name != "matting":
            gpu_sum += entry["s_per_image"]
    print("-" * len(head))
    print(f"{'GPU stages, sum':<16} {'image':<6} {'':>11} {'':>11} {'':>7} {_fmt(gpu_sum):>11}")
    m = stages.get("matting")
    if m and m.get("available") and args.matting_workers:
        print(f"{'matting / workers':<16} {'image':<6} {'':>11} {'':>11} {'':>7} "
              f"{_fmt(m['s_per_image'] / args.matting_workers):>11}   ({args.matting_workers} workers)")  # fmt: skip
    total = result.get("total")
    if total:
        target = ANCHORS["total"]["s"]
        verdict = "meets" if total["s_per_image"] <= target else "misses"
        print(f"{'total (e2e)':<16} {'image':<6} {_fmt(total['s_per_image']):>11} {'<= ' + _fmt(target):>11} "
              f"{total['s_per_image'] / target:>6.2f}x {_fmt(total['s_per_image']):>11} "
              f"{total['peak_mem_gb'] if total['peak_mem_gb'] is not None else '-':>8}")  # fmt: skip
        bd = ", ".join(f"{k} {_fmt(v)}" for k, v in total["breakdown_s_per_image"].items())
        print(
            f"  e2e per image: {bd}; matting tail {_fmt(total['matting_tail_s'])} total; matting: {total['matting']}"
        )
        if total.get("cpu_overlap"):
            bg = ", ".join(f"{k} {_fmt(v)}" for k, v in total["cpu_overlapped_s_per_image"].items())
            print(f"  on the CPU thread, overlapping the GPU (per image): {bg}")
        if comparable:
            print(f"  end to end {verdict} the {_fmt(target)} per image target")
    elif "e2e" in result.get("errors", {}):
        print(f"total (e2e) FAILED: {result['errors']['e2e']}")
    print_sides(result)


def print_sides(result: dict[str, Any]) -> None:
    """The sampling sides: the rule, holes per side and, after an e2e case, each bucket's time per hole."""
    cfg = result.get("completion")
    if not cfg:
        return
    if cfg["mode"] == "fixed":
        rule = f"fixed: every crop at {cfg['side']} px"
    else:
        rule = (f"bucketed: crop side rounded up to {cfg['bucket_step']} px, at least {cfg['min_side']}, "
                f"at most {cfg['max_side']}")  # fmt: skip
    sides = result.get("scenes", {}).get("completion_sides", {})
    dist = ", ".join(f"{side} px: {n}" for side, n in sides.items()) or "no holes"
    print(f"\ncompletion sides ({rule}); holes per side: {dist}")
    per_side = (result.get("total") or {}).get("completion", {}).get("per_side")
    if not per_side:
        return
    head = (
        f"  {'side px':>7} {'holes':>6} "
        + " ".join(f"{s:>16}" for s in COMPLETION_STAGES)
        + f" {'per hole':>10}"
    )
    print("  e2e completion time per hole, by sampling side:")
    print(head)
    for side, b in per_side.items():
        stages = " ".join(f"{_fmt(b[f'{s}_s_per_hole']):>16}" for s in COMPLETION_STAGES)
        print(f"  {side:>7} {b['holes']:>6} {stages} {_fmt(b['s_per_hole']):>10}")


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_engine.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=("auto", "full", "tiny"), default="auto",
                   help="model sizes and defaults: full (OWLv2-base, SAM ViT-H, SD3-medium + SD3 VAE; 16 scenes at "
                        "1024 px, 28 steps), tiny (tiny models, 3 scenes at 192 px, 2 steps at 64 px, for a CPU); "
                        "auto (default): full on CUDA, tiny on the CPU")  # fmt: skip
    p.add_argument(
        "--device",
        default=None,
        help="torch device: cuda, cuda:N or cpu (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--scenes", type=int, default=None, help="synthetic scenes (seeds 0..N-1); full 16, tiny 3"
    )
    p.add_argument(
        "--size", type=int, default=None, help="scene side in pixels (square); full 1024, tiny 192"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="flow-matching Euler steps per completion; full 28, tiny 2"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per OWLv2 / SAM-encoder batch and per end-to-end group; full 4, tiny 2",
    )
    p.add_argument("--sd3-batch", type=int, default=None,
                   help="holes per SD3-transformer batch (the holes of a group are sampled together in batches "
                        "of this size); full 8, tiny 4")  # fmt: skip
    p.add_argument(
        "--vae-batch", type=int, default=None, help="crops per VAE encode/decode call; full 4, tiny 2"
    )
    p.add_argument("--completion-sides", choices=COMPLETION_SIDES, default="bucketed",
                   help="sampling side of each hole's crop in the e2e case: bucketed (default) = the crop's side "
                        "rounded up to --bucket-step, at least --min-side, at most the model's side (1024 px full, "
                        "64 px tiny; larger crops are downsampled), holes batched per side; fixed = every crop "
                        "resized to the model's side")  # fmt: skip
    p.add_argument("--completion-schedule", choices=COMPLETION_SCHEDULES, default="queue",
                   help="e2e: queue (default) = holes wait in one queue per sampling side across groups and a side "
                        "runs when it holds --sd3-batch holes (the rest after the last group); group = each group's "
                        "holes are sampled before the next group starts, per side, in batches of --sd3-batch "
                        "(what the first H100 figures measured)")  # fmt: skip
    p.add_argument("--matting-unit", choices=("layer", "scene"), default="layer",
                   help="e2e: one matting job per layer (default; a scene's layers in parallel, as the Ray "
                        "pipeline's matting stage works per layer) or one per scene (what the first H100 figures "
                        "measured)")  # fmt: skip
    p.add_argument("--bucket-step", type=int, default=None,
                   help="bucketed sides are multiples of this, pixels (a multiple of 16 = VAE factor 8 x patch 2); "
                        "full 256, tiny 16")  # fmt: skip
    p.add_argument("--min-side", type=int, default=None,
                   help="smallest bucketed side, pixels (rounded up to --bucket-step); full 512, tiny 32")  # fmt: skip
    p.add_argument("--holes", type=int, default=None,
                   help="completion holes per image; default: from each scene's ground truth (one background hole "
                        "per entity + one amodal hole per occluded entity)")  # fmt: skip
    p.add_argument("--cfg", action="store_true",
                   help=f"classifier-free guidance (scale {CFG_SCALE}): doubles the transformer batch; the anchor "
                        "is without")  # fmt: skip
    p.add_argument(
        "--weights-dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="stored weights; both run under bf16 autocast on CUDA; auto (the default): bf16 on CUDA, as a "
        "production engine serves them, fp32 on the CPU; bf16 on the CPU runs under CPU bf16 autocast (slow: "
        "a check of the dtype flow, not a timing)",
    )
    p.add_argument(
        "--cpu-overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="e2e: the CPU pre- and post-processing (model inputs and hole crops of the next group, pasting the "
        "completed holes, submitting matting) runs on a thread while the GPU works, as the Ray pipeline's CPU "
        "stages run in their own actors (default); --no-cpu-overlap runs it in line, between GPU stages",
    )
    p.add_argument(
        "--matting-workers",
        type=int,
        default=None,
        help="CPU processes for matting (0: no matting); full: CPUs - 2, tiny: 1",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed iterations before each stage; full 2, tiny 1"
    )
    p.add_argument(
        "--iters", type=int, default=None, help="timed iterations of each stage (median); full 5, tiny 2"
    )
    p.add_argument(
        "--sd3-iters",
        type=int,
        default=None,
        help="timed runs of the whole --steps loop in the sd3_transformer case; default 1",
    )
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all, in that order)",
    )
    p.add_argument("--out", default=None,
                   help="JSON written after every case; default bench/results/gpu_engine.json (full preset) or "
                        "bench/results/gpu_engine_tiny.json (tiny preset, so a CPU run never overwrites GPU figures)")  # fmt: skip
    args = p.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = args.device.split(":")[0]
    if dev_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    elif dev_type != "cpu":
        p.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    if args.weights_dtype == "auto":
        args.weights_dtype = "bf16" if dev_type == "cuda" else "fp32"
    if args.preset == "auto":
        args.preset = "full" if dev_type == "cuda" else "tiny"
    if args.preset == "full" and dev_type == "cpu":
        print("warning: the full preset on the CPU takes hours (SD3-medium at 1024 px); use --preset tiny",
              file=sys.stderr)  # fmt: skip
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        p.error(f"--cases: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(CASES)}")
    args.cases = [c for c in CASES if c in cases]
    for key in ("scenes", "size", "steps", "batch", "sd3_batch", "vae_batch", "iters", "sd3_iters", "bucket_step",
                "min_side"):  # fmt: skip
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    multiple = side_multiple(args.preset)
    if args.bucket_step % multiple:
        p.error(
            f"--bucket-step {args.bucket_step}: must be a multiple of {multiple} px (VAE factor x patch size)"
        )
    if args.size < 32:
        p.error("--size must be at least 32 (make_scene's smallest)")
    if args.holes is not None and args.holes < 1:
        p.error("--holes must be at least 1")
    if args.warmup < 0 or args.matting_workers < 0:
        p.error("--warmup and --matting-workers cannot be negative")
    if args.out is None:
        args.out = str(RESULTS / ("gpu_engine.json" if args.preset == "full" else "gpu_engine_tiny.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
