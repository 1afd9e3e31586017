"""The ``engine`` configuration section (YAML key ``engine``, variables ``REFLADE_ENGINE_<FIELD>``).

One dataclass per stage plus the splits and the resources; ``EngineConfig`` is all of them in one flat section,
so the keys users write stay flat (``engine: {max_side: 1024, batch_size: 8}``) and a stage's code may take just
its own part (an ``EngineConfig`` is a ``PreFilterConfig``, a ``SceneConfig``, ...).

Every field says on itself whether it changes what the engine outputs: ``output(...)`` fields are part of
:meth:`EngineConfig.fingerprint` (and so of every ``sample_id``), ``resource(...)`` fields are not. A field declared
with plain ``field()`` or a bare default counts as output, so forgetting to classify one can only make a run
recompute, never reuse samples made under other settings; ``tests/engine/test_engine_config.py`` checks that every field
is classified. A field added after datasets were made is declared ``output(default, omit_default=True)``: it counts
once set away from its default, and at its default it is left out, so that the defaults' fingerprint (and the sample
ids of every dataset made with them) stays what it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

OUTPUT = "output"
"""Metadata key of a field: True when the field changes the engine's output (see the module docstring)."""
OMIT_DEFAULT = "omit_default"
"""Metadata key of an output field: True when its default value is left out of the fingerprint."""


def output(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    omit_default: bool = False,
) -> Any:
    """A field that changes what the engine outputs: part of the fingerprint.

    Args:
        omit_default: leave the field out of the fingerprint while it holds its default (fields added after
            datasets were made with the defaults; see the module docstring).
    """
    metadata = {OUTPUT: True, OMIT_DEFAULT: True} if omit_default else {OUTPUT: True}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def resource(default: Any) -> Any:
    """A field that changes only how the engine runs (resources, layout, caches): not in the fingerprint."""
    return field(default=default, metadata={OUTPUT: False})


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def changes_output(f: dataclasses.Field) -> bool:
    """Whether field ``f`` counts in the fingerprint (unclassified fields do)."""
    return bool(f.metadata.get(OUTPUT, True))


@dataclass(kw_only=True)
class PreFilterConfig:
    """Stage 1: which images are decoded and kept, and near-duplicates."""

    max_side: int = output(1024)
    """Longest side of the stored image, pixels (larger images are downscaled)."""
    min_side: int = output(64)
    """Images whose shorter side is below this are rejected ("too small"), pixels."""
    max_pixels: int = output(80_000_000)
    """Images whose header declares more pixels are refused before decoding ("too large")."""
    max_file_mb: float = output(64.0)
    """Files larger than this are refused without reading them whole, MiB."""
    max_aspect: float = output(4.0)
    """Longest/shortest side above this is rejected ("extreme aspect ratio")."""
    min_saturation: float = output(0.04)
    """Mean HSV saturation (0-1) below this is rejected as grayscale."""
    min_std: float = output(8.0)
    """Grey-level standard deviation (0-255) below this is rejected as near-constant."""
    min_sharpness: float = output(15.0)
    """Variance of the Laplacian (at 512 px) below this is rejected as blurry."""
    dup_hamming: int = output(6)
    """Perceptual hashes (64-bit) within this Hamming distance are near-duplicates; the first is kept."""


def _vocabulary() -> list[str]:
    return [
        "person",
        "cat",
        "dog",
        "car",
        "bicycle",
        "chair",
        "table",
        "bottle",
        "cup",
        "book",
        "plant",
        "ball",
    ]


@dataclass(kw_only=True)
class SceneConfig:
    """Stage 2: candidate entities (and, with the neural backends, the detector, SAM and the captioner)."""

    max_entities: int = output(6)
    """Most entities kept per image (highest scores first)."""
    min_entity_area: float = output(0.01)
    """Smallest entity, as a fraction of the image area."""
    max_entity_area: float = output(0.6)
    """Largest entity, as a fraction of the image area."""
    merge_iou: float = output(0.5)
    """Candidates from different detectors with mask IoU above this are merged."""
    sam_weights: str = output("weights/tiny-sam@latest")
    """Registry reference of the SAM weights (a folder: config.json + model.safetensors)."""
    detector_weights: str = output("weights/tiny-owlv2@latest")
    """Registry reference of the open-vocabulary detector (an OWLv2 save_pretrained folder with its tokenizer)."""
    captioner_weights: str = output("weights/tiny-blip@latest")
    """Registry reference of the captioner (a BLIP captioning save_pretrained folder with its tokenizer); its
    captions of each entity's crop make the fine text prompts. Empty: no captioner, template text only."""
    caption_max_new_tokens: int = output(16)
    """Most tokens the captioner generates per entity (greedy decoding)."""
    vocabulary: list[str] = output(default_factory=_vocabulary)
    """Category words the detector is queried with ("a photo of a <word>"); neural labels come from here."""
    detector_threshold: float = output(0.1)
    """Detector boxes scoring below this (sigmoid, 0-1) are dropped (see detector_fallback)."""
    detector_fallback: bool = output(True)
    """When no box passes detector_threshold, keep the best boxes anyway (tiny random weights score alike)."""


@dataclass(kw_only=True)
class CompletionConfig:
    """Stage 3: amodal completion of each entity and of the background behind it."""

    completion_weights: str = output("weights/tiny-repaint@latest")
    """Registry reference of the inpainting diffusion model (a folder with unet/ and scheduler/)."""
    completion_steps: int = output(4)
    """Denoising steps of the RePaint sampler (4 for CPU runs with tiny weights; about 50 with real weights)."""
    completion_dilate_px: int = output(4)
    """The background hole is the entity's mask dilated by this many pixels."""
    completion_seed: int = output(0)
    """Seed mixed into each hole's noise (with the image's sha256, the entity id and the hole kind)."""
    completion_model: str = output("repaint", omit_default=True)
    """Model of the neural completion backend: ``repaint`` (pixel-space UNet, ``completion_weights``) or
    ``sd3-inpaint`` (SD3-family latent inpainting, ``sd3_weights``). The classical family ignores it."""
    sd3_weights: str = output("weights/tiny-sd3-inpaint@latest", omit_default=True)
    """Registry reference of the SD3-family inpainting checkpoint (a diffusers ``StableDiffusion3InpaintPipeline``
    folder: transformer/, vae/, scheduler/, with or without the text encoders) for ``completion_model:
    sd3-inpaint``."""
    completion_dtype: str = output("auto", omit_default=True)
    """Dtype of the SD3 inpainting networks: ``auto`` (bfloat16 on CUDA, float32 on the CPU), ``float32``,
    ``bfloat16`` or ``float16``."""
    completion_calls_in_flight: int = resource(2)
    """Ray Data batches one neural completion actor of the staged layout works on at once; their holes share
    sampler batches (engine/completion_batcher.py). 1: one batch at a time."""
    completion_batch_wait_s: float = resource(0.05)
    """With calls in flight: seconds without a new hole after which the completion actor samples its part-filled
    groups of holes."""


@dataclass(kw_only=True)
class MattingConfig:
    """Stage 4: mask refinement and alpha matting."""

    matting_band_px: int = output(6)
    """Half-width of the unknown band of the trimap around a mask edge, pixels."""


@dataclass(kw_only=True)
class PromptConfig:
    """Stage 5: prompts for every layer."""

    points_per_prompt: int = output(3)
    """Positive points sampled in the visible region for a fine point prompt."""


@dataclass(kw_only=True)
class PostFilterConfig:
    """Stage 6: fidelity checks of each layer."""

    min_alpha_fraction: float = output(0.002)
    """A foreground layer whose alpha covers less than this fraction of the image is rejected."""
    max_alpha_fraction: float = output(0.9)
    """A foreground layer whose alpha covers more than this fraction is rejected."""
    max_visible_change: float = output(12.0)
    """Mean absolute RGB difference (0-255) allowed between a layer and the image on its visible pixels."""
    max_amodal_ratio: float = output(4.0)
    """A foreground layer whose alpha area exceeds this many times its visible area is rejected."""


@dataclass(kw_only=True)
class SplitConfig:
    """Which split each row goes to."""

    test_fraction: float = output(0.1)
    """Fraction of source images (by hash, deterministic) whose layers go to the test split."""
    synthetic_split: str = output("test")
    """Split of rows made from synthetic scenes (exact ground truth): ``train``, ``test``, ``quality``, or ``hash``
    (by scene id: ``synthetic_test_fraction`` of the scenes to ``test``, the rest to ``train``)."""
    synthetic_test_fraction: float = output(0.5)
    """With ``synthetic_split: hash``: the fraction of synthetic scenes whose rows go to the test split."""


@dataclass(kw_only=True)
class ResourceConfig:
    """How the stages run on Ray: none of these changes a sample."""

    batch_size: int = resource(4)
    """Images per Ray Data batch."""
    cpu_actors: int = resource(1)
    """Actors in each CPU actor pool (scene, completion and matting with classical backends)."""
    gpu_actors: int = resource(1)
    """Actors in each GPU actor pool (neural scene and completion when num_gpus > 0)."""
    num_gpus: float = resource(0.0)
    """GPUs per neural-stage actor (0 on a CPU machine)."""
    num_cpus_per_actor: float = resource(0.5)
    """CPUs reserved per stage actor (three pools must fit beside the tasks on a 2-CPU node)."""
    num_cpus_per_task: float = resource(0.5)
    """CPUs reserved per stage task (read, pre-filter, prompts, post-filter, write)."""
    layout: str = resource("auto")
    """How stages 2-6 are laid out on Ray: ``staged`` (one actor pool per model stage: scene, completion,
    matting, each ``cpu_actors``/``gpu_actors`` actors; prompts and post-filter as tasks), ``fused`` (stages 2-6
    called in sequence inside ONE actor class, ``fused_actors`` actors of ``num_cpus_per_actor`` CPUs: no
    hand-off between stages), or ``auto``: fused for the classical backends, staged for the neural ones (their
    models stay one copy per pool, and with GPUs the CPU matting pool overlaps the GPU stages)."""
    fused_actors: int = resource(0)
    """Actors of the fused layout; 0: ``gpu_actors`` when they take GPUs, else one per CPU of the Ray cluster at
    the start of the run."""
    weights_cache: str = resource("")
    """Folder for downloaded weights; empty means $XDG_CACHE_HOME/reflade/weights (~/.cache/reflade/weights)."""
    weights_dir: str = resource("")
    """A local folder of weights folders named like the references' names (``DIR/sam-vit-h`` for
    ``weights/sam-vit-h@...``); when set, the neural backends load from it instead of the registry (a machine
    without an object store: the GPU check). Empty: the registry. Like ``weights_cache`` it says where the named
    weights are read from, not which: the references stay in the fingerprint."""


STAGE_CONFIGS: dict[str, type] = {
    "prefilter": PreFilterConfig,
    "scene": SceneConfig,
    "completion": CompletionConfig,
    "matting": MattingConfig,
    "prompts": PromptConfig,
    "postfilter": PostFilterConfig,
    "splits": SplitConfig,
    "resources": ResourceConfig,
}
"""The parts of ``EngineConfig``, in pipeline order."""


@dataclass(kw_only=True)
class EngineConfig(
    ResourceConfig,
    SplitConfig,
    PostFilterConfig,
    PromptConfig,
    MattingConfig,
    CompletionConfig,
    SceneConfig,
    PreFilterConfig,
):
    """Thresholds and resources of the data engine's six stages: every part of ``STAGE_CONFIGS`` in one flat
    section (fields in pipeline order)."""

    def part(self, name: str) -> Any:
        """The ``STAGE_CONFIGS[name]`` part of this configuration, as its own dataclass (a copy)."""
        cls = STAGE_CONFIGS[name]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def output_values(self) -> dict[str, Any]:
        """The values of every field that changes the output (see the module docstring)."""
        values = dataclasses.asdict(self)
        return {
            f.name: values[f.name]
            for f in dataclasses.fields(self)
            if changes_output(f) and not (f.metadata.get(OMIT_DEFAULT) and values[f.name] == _default(f))
        }

    def fingerprint(self) -> str:
        """Hash of every field that changes what the engine outputs (resources excluded)."""
        return hashlib.sha256(json.dumps(self.output_values(), sort_keys=True).encode()).hexdigest()[:16]
