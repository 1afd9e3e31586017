"""The ``engine`` configuration section (YAML key ``engine``, variables ``REFLADE_ENGINE_<FIELD>``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(kw_only=True)
class EngineConfig:
    """Thresholds and resources of the data engine's six stages."""

    # ---- 1. pre-filter
    max_side: int = 1024
    """Longest side of the stored image, pixels (larger images are downscaled)."""
    min_side: int = 64
    """Images whose shorter side is below this are rejected ("too small"), pixels."""
    max_pixels: int = 80_000_000
    """Images whose header declares more pixels are refused before decoding ("too large")."""
    max_file_mb: float = 64.0
    """Files larger than this are refused without reading them whole, MiB."""
    max_aspect: float = 4.0
    """Longest/shortest side above this is rejected ("extreme aspect ratio")."""
    min_saturation: float = 0.04
    """Mean HSV saturation (0-1) below this is rejected as grayscale."""
    min_std: float = 8.0
    """Grey-level standard deviation (0-255) below this is rejected as near-constant."""
    min_sharpness: float = 15.0
    """Variance of the Laplacian (at 512 px) below this is rejected as blurry."""
    dup_hamming: int = 6
    """Perceptual hashes (64-bit) within this Hamming distance are near-duplicates; the first is kept."""
    # ---- 2. scene understanding
    max_entities: int = 6
    """Most entities kept per image (highest scores first)."""
    min_entity_area: float = 0.01
    """Smallest entity, as a fraction of the image area."""
    max_entity_area: float = 0.6
    """Largest entity, as a fraction of the image area."""
    merge_iou: float = 0.5
    """Candidates from different detectors with mask IoU above this are merged."""
    # ---- 3/4. completion and matting
    matting_band_px: int = 6
    """Half-width of the unknown band of the trimap around a mask edge, pixels."""
    # ---- 5. prompts
    points_per_prompt: int = 3
    """Positive points sampled in the visible region for a fine point prompt."""
    # ---- 6. post-filter
    min_alpha_fraction: float = 0.002
    """A foreground layer whose alpha covers less than this fraction of the image is rejected."""
    max_alpha_fraction: float = 0.9
    """A foreground layer whose alpha covers more than this fraction is rejected."""
    max_visible_change: float = 12.0
    """Mean absolute RGB difference (0-255) allowed between a layer and the image on its visible pixels."""
    max_amodal_ratio: float = 4.0
    """A foreground layer whose alpha area exceeds this many times its visible area is rejected."""
    # ---- neural backends (family "neural": stages 2 and 3)
    sam_weights: str = "weights/tiny-sam@latest"
    """Registry reference of the SAM weights (a folder: config.json + model.safetensors)."""
    detector_weights: str = "weights/tiny-owlv2@latest"
    """Registry reference of the open-vocabulary detector (an OWLv2 save_pretrained folder with its tokenizer)."""
    completion_weights: str = "weights/tiny-repaint@latest"
    """Registry reference of the inpainting diffusion model (a folder with unet/ and scheduler/)."""
    captioner_weights: str = "weights/tiny-blip@latest"
    """Registry reference of the captioner (a BLIP captioning save_pretrained folder with its tokenizer); its
    captions of each entity's crop make the fine text prompts. Empty: no captioner, template text only."""
    caption_max_new_tokens: int = 16
    """Most tokens the captioner generates per entity (greedy decoding)."""
    vocabulary: list[str] = field(
        default_factory=lambda: [
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
    )
    """Category words the detector is queried with ("a photo of a <word>"); neural labels come from here."""
    detector_threshold: float = 0.1
    """Detector boxes scoring below this (sigmoid, 0-1) are dropped (see detector_fallback)."""
    detector_fallback: bool = True
    """When no box passes detector_threshold, keep the best boxes anyway (tiny random weights score alike)."""
    completion_steps: int = 4
    """Denoising steps of the RePaint sampler (4 for CPU runs with tiny weights; about 50 with real weights)."""
    completion_dilate_px: int = 4
    """The background hole is the entity's mask dilated by this many pixels."""
    completion_seed: int = 0
    """Seed mixed into each hole's noise (with the image's sha256, the entity id and the hole kind)."""
    weights_cache: str = ""
    """Folder for downloaded weights; empty means $XDG_CACHE_HOME/reflade/weights (~/.cache/reflade/weights)."""
    # ---- splits and resources
    test_fraction: float = 0.1
    """Fraction of source images (by hash, deterministic) whose layers go to the test split."""
    synthetic_split: str = "test"
    """Split of rows made from synthetic scenes (exact ground truth): ``train``, ``test``, ``quality``, or ``hash``
    (by scene id: ``synthetic_test_fraction`` of the scenes to ``test``, the rest to ``train``)."""
    synthetic_test_fraction: float = 0.5
    """With ``synthetic_split: hash``: the fraction of synthetic scenes whose rows go to the test split."""
    batch_size: int = 4
    """Images per Ray Data batch."""
    cpu_actors: int = 1
    """Actors in each CPU actor pool (scene, completion and matting with classical backends)."""
    gpu_actors: int = 1
    """Actors in each GPU actor pool (neural scene and completion when num_gpus > 0)."""
    num_gpus: float = 0.0
    """GPUs per neural-stage actor (0 on a CPU machine)."""
    num_cpus_per_actor: float = 0.5
    """CPUs reserved per stage actor (three pools must fit beside the tasks on a 2-CPU node)."""
    num_cpus_per_task: float = 0.5
    """CPUs reserved per stage task (read, pre-filter, prompts, post-filter, write)."""
    layout: str = "auto"
    """How stages 2-6 are laid out on Ray: ``staged`` (one actor pool per model stage: scene, completion,
    matting, each ``cpu_actors``/``gpu_actors`` actors; prompts and post-filter as tasks), ``fused`` (stages 2-6
    called in sequence inside ONE actor class, ``fused_actors`` actors of ``num_cpus_per_actor`` CPUs: no
    hand-off between stages), or ``auto``: fused for the classical backends, staged for the neural ones (their
    models stay one copy per pool, and with GPUs the CPU matting pool overlaps the GPU stages)."""
    fused_actors: int = 0
    """Actors of the fused layout; 0: ``gpu_actors`` when they take GPUs, else one per CPU of the Ray cluster at
    the start of the run."""

    def fingerprint(self) -> str:
        """Hash of every field that changes what the engine outputs (resources excluded)."""
        data = {
            k: v
            for k, v in asdict(self).items()
            if k
            not in (
                "batch_size",
                "cpu_actors",
                "gpu_actors",
                "num_gpus",
                "num_cpus_per_actor",
                "num_cpus_per_task",
                "weights_cache",
                "layout",
                "fused_actors",
            )
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
