"""Backends of the model-holding stages, by family: ``classical`` (no weights, CPU) and ``neural``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reflade.engine.config import EngineConfig

FAMILIES = ("classical", "neural")
COMPLETION_MODELS = ("repaint", "sd3-inpaint")
"""Values of ``engine.completion_model``: the neural family's completion backends."""


@dataclass
class Backends:
    """The backend of each model stage, and the registry references of every weights version they use."""

    scene: Any
    completion: Any
    matting: Any
    weights: list[str] = field(default_factory=list)

    def names(self) -> dict[str, str]:
        return {"scene": self.scene.name, "completion": self.completion.name, "matting": self.matting.name}


def make_scene_backend(family: str, cfg: EngineConfig, registry=None):
    if family == "classical":
        from reflade.engine.backends.classical_scene import ClassicalSceneBackend

        return ClassicalSceneBackend(cfg)
    if family == "neural":
        from reflade.engine.backends.neural_scene import NeuralSceneBackend

        return NeuralSceneBackend(cfg, registry=registry)
    raise ValueError(f"unknown backend family {family!r} (known: {', '.join(FAMILIES)})")


def make_completion_backend(family: str, cfg: EngineConfig, registry=None):
    if family == "classical":
        from reflade.engine.backends.classical_completion import ClassicalCompletionBackend

        return ClassicalCompletionBackend(cfg)
    if family == "neural":
        model = getattr(cfg, "completion_model", "repaint")
        if model == "sd3-inpaint":
            from reflade.engine.backends.sd3_inpaint import SD3InpaintCompletionBackend

            return SD3InpaintCompletionBackend(cfg, registry=registry)
        if model != "repaint":
            raise ValueError(
                f"unknown engine.completion_model {model!r} (known: {', '.join(COMPLETION_MODELS)})"
            )
        from reflade.engine.backends.neural_completion import NeuralCompletionBackend

        return NeuralCompletionBackend(cfg, registry=registry)
    raise ValueError(f"unknown backend family {family!r} (known: {', '.join(FAMILIES)})")


def make_matting_backend(family: str, cfg: EngineConfig, registry=None):
    # Matting stays classical in both families: it is CPU work that overlaps the GPU stages.
    from reflade.engine.backends.classical_matting import ClassicalMattingBackend

    return ClassicalMattingBackend(cfg)


def weights_refs(family: str, cfg: EngineConfig) -> list[str]:
    """Registry references of the weights the family loads (for lineage)."""
    if family == "neural":
        from reflade.engine.backends.neural_models import weights_refs as neural_refs

        return neural_refs(cfg)
    return []
