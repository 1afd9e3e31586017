"""The ``eval`` configuration section (YAML key ``eval``, variables ``REFLADE_EVAL_<FIELD>``).

``reflade eval run`` reads it and applies its flags on top: defaults < YAML file < ``REFLADE_EVAL_*`` < flags.
This module imports neither torch nor Ray: the configuration loader imports every registered section at each
``reflade`` invocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALL_PROMPT_TYPES",
    "BASELINES",
    "DEFAULT_PROMPT_TYPES",
    "EvalConfig",
    "REAL_NETWORK_REFS",
    "STAND_IN_NETWORKS",
    "parse_prompt_types",
]

_TYPES = ("point", "box", "mask", "text", "text+box", "text+point")
ALL_PROMPT_TYPES: tuple[str, ...] = tuple(f"{t}:{g}" for t in _TYPES for g in ("coarse", "fine"))
"""The twelve prompt types a dataset row carries, as ``TYPE:GRANULARITY`` (the engine's prompt stage)."""
DEFAULT_PROMPT_TYPES: tuple[str, ...] = ("text+box:fine",)
"""The paper's evaluation prompt: fine text and a fine box."""
BASELINES = ("copy-visible", "classical")
"""Reference rows beside every model: the visible pixels as they are, and the weight-free decomposer."""
REAL_NETWORK_REFS = {
    "lpips": "weights/lpips-alexnet",
    "clip": "weights/clip-vit-large-patch14",
    "inception": "weights/fid-inception-v3",
}
"""Where ``reflade eval convert-weights`` + ``reflade registry import`` put the published feature networks."""
STAND_IN_NETWORKS = {
    "lpips": "weights/tiny-alexnet",
    "clip": "weights/tiny-clip",
    "inception": "weights/tiny-inception",
}
"""The random-init stand-ins ``reflade eval stand-in-weights`` registers (tests, CPU demos; labelled in reports)."""


def parse_prompt_types(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``all``, one ``TYPE:GRANULARITY`` or a comma-separated list of them -> the tuple, checked and ordered.

    A type without a granularity means both (``box`` -> ``box:coarse, box:fine``).

    Raises:
        ValueError: an unknown type or granularity (the message lists the known ones).
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError(f"no prompt types given (known: all, {', '.join(ALL_PROMPT_TYPES)})")
    out: list[str] = []
    for item in items:
        if item == "all":
            out.extend(ALL_PROMPT_TYPES)
        elif item in _TYPES:
            out.extend((f"{item}:coarse", f"{item}:fine"))
        elif item in ALL_PROMPT_TYPES:
            out.append(item)
        else:
            raise ValueError(
                f"unknown prompt type {item!r} (known: all, a type of {', '.join(_TYPES)}, "
                f"or TYPE:GRANULARITY such as text+box:fine)"
            )
    return tuple(t for t in ALL_PROMPT_TYPES if t in set(out))


@dataclass(kw_only=True)
class EvalConfig:
    """Settings of ``reflade eval``: what is scored, with which feature networks, and the gate."""

    dataset: str = "dataset/reflade-demo@latest:test"
    """Dataset reference scored (``:SPLIT`` picks a split; the default split is ``test``)."""
    prompt_types: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPT_TYPES))
    """Prompt types scored, ``TYPE:GRANULARITY`` or ``all`` (the twelve); default the paper's ``text+box:fine``."""
    metric_size: int = 256
    """Longest side, in pixels, of the frame every metric is computed in (the ground truth's frame resized)."""
    max_samples: int = 0
    """Score at most this many dataset rows (the first by ``sample_id``); 0: all of them."""
    lpips_net: str = REAL_NETWORK_REFS["lpips"]
    """Registry reference of LPIPS's AlexNet backbone (S_vis)."""
    clip_net: str = REAL_NETWORK_REFS["clip"]
    """Registry reference of the CLIP image encoder (S_gen)."""
    inception_net: str = REAL_NETWORK_REFS["inception"]
    """Registry reference of the FID Inception network (S_fid)."""
    steps: int = 20
    """Sampling steps of a diffusion model's decomposition."""
    guidance: float = 1.0
    """Classifier-free guidance scale of a model's decomposition (1: none)."""
    seed: int = 0
    """Seed of every decomposition (each item gets this seed: reruns give the same layers)."""
    batch_size: int = 8
    """Items per Ray Data batch, for inference and for feature extraction."""
    predict_actors: int = 1
    """Actors of the pool that decomposes (each holds every model)."""
    score_actors: int = 1
    """Actors of the pool that computes the metrics and features (each holds the three feature networks)."""
    num_gpus: float = 0.0
    """GPUs per actor (0: CPU); the model and the feature networks run on ``cuda`` when > 0."""
    bf16: bool | None = None
    """bf16 autocast of the feature networks (LPIPS, CLIP, Inception); None: on for CUDA, off on the CPU. The
    model's own sampling follows the pipeline's rule (autocast on CUDA)."""
    num_cpus: float = 0.5
    """CPUs per actor. Both pools at 0.5 leave a 2-core node a core for the read tasks (at 1 each, the two pools
    would hold both cores and the streaming read could never run)."""
    threads: int = 0
    """Torch threads per actor (0: Ray's default, one per requested CPU)."""
    gate_margins: dict[str, float] = field(default_factory=lambda: {"hpa": 0.01})
    """Metric -> largest allowed drop against the baseline (``hpa``, ``s_vis``, ``s_gen``, ``s_fid`` or a
    weight-free metric such as ``hidden_rgb_mae``), compared per layer kind; a metric where lower is better may not
    rise by more than its margin."""
    report_samples: int = 4
    """Best and worst samples shown in the report's grid, per layer kind."""
    bounds: dict[str, Any] = field(default_factory=dict)
    """HPA normalisation bounds in ``HPANormalization.to_dict()``'s form (``{foreground: {fid_min: .., fid_max: ..,
    ...}, background: {...}, clip: false}``); empty: the documented defaults (``reflade.eval.hpa``)."""
    weights_cache: str = ""
    """Local folder of downloaded feature networks and models (empty: ``~/.cache/reflade/weights``)."""

    def validate(self) -> None:
        """Check every field (the configuration loader calls this after the YAML file and the environment).

        Raises:
            ConfigError: (a ValueError) naming the key and its value.
        """
        from reflade.platform.config import ConfigError

        try:
            self._check()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _check(self) -> None:
        if self.metric_size < 16:
            raise ValueError(f"eval.metric_size must be at least 16 pixels, got {self.metric_size}")
        for name in ("batch_size", "predict_actors", "score_actors", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_samples < 0 or self.num_gpus < 0 or self.num_cpus <= 0 or self.threads < 0:
            raise ValueError("eval.max_samples, num_gpus and threads must be >= 0 and num_cpus > 0")
        if self.report_samples < 0:
            raise ValueError(f"eval.report_samples must be >= 0, got {self.report_samples}")
        for metric, margin in self.gate_margins.items():
            if not isinstance(margin, int | float) or margin < 0:
                raise ValueError(f"eval.gate_margins[{metric!r}] must be a number >= 0, got {margin!r}")
        parse_prompt_types(self.prompt_types)
