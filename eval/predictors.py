"""What an evaluation scores: a registered model, the weight-free ``classical`` decomposer, or ``copy-visible``.

Every predictor answers :meth:`Predictor.predict` on a batch of :class:`EvalItem` with one layer per item, or the
reason it refuses that item (``classical`` refuses a text-only prompt: it reads no text). Models and
``classical`` go through the decomposition API (:class:`reflade.engine.decompose.Decomposer`), exactly as a user
calls them; ``copy-visible`` reads the row's visible mask (an oracle of the visible part, so that a model's
completion is judged against doing nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from reflade.engine.decompose import PromptError

__all__ = [
    "CopyVisible",
    "DecomposerPredictor",
    "EvalItem",
    "Predictor",
    "build_predictor",
    "is_baseline",
]


@dataclass
class EvalItem:
    """One (dataset row, prompt type) pair to score.

    Attributes:
        item_id: ``SAMPLE_ID/PROMPT_TYPE``, unique in an evaluation.
        sample_id: the dataset row's id.
        prompt_type: ``TYPE:GRANULARITY`` (``text+box:fine``).
        kind: ``foreground`` or ``background``.
        image: HxWx3 uint8 RGB, the row's image.
        truth: HxWx4 uint8 straight-alpha ground-truth layer.
        visible: HxW bool, the ground truth's visible mask.
        prompt: the prompt in the sample format (image pixel frame).
        exact: the ground truth is exact behind occluders (synthetic rows).
        seed: the decomposition's seed.
    """

    item_id: str
    sample_id: str
    prompt_type: str
    kind: str
    image: np.ndarray
    truth: np.ndarray
    visible: np.ndarray
    prompt: dict[str, Any]
    exact: bool
    seed: int = 0


class Predictor(Protocol):
    """A batch of items in, one HxWx4 uint8 layer (the item's image size) or a refusal reason (str) per item out."""

    name: str
    """What the report calls it: an exact model reference, ``classical`` or ``copy-visible``."""

    def predict(self, items: Sequence[EvalItem]) -> list[np.ndarray | str]: ...


def is_baseline(name: str) -> bool:
    """True for the weight-free reference rows (``copy-visible``, ``classical``)."""
    return name in ("copy-visible", "classical")


class CopyVisible:
    """Foreground: the visible pixels with alpha = the visible mask. Background: the image as it is (alpha 255).

    Nothing hidden is invented: every completion metric of this row is what doing nothing scores.
    """

    name = "copy-visible"

    def predict(self, items: Sequence[EvalItem]) -> list[np.ndarray | str]:
        out: list[np.ndarray | str] = []
        for it in items:
            h, w = it.image.shape[:2]
            layer = np.zeros((h, w, 4), np.uint8)
            if it.kind == "foreground":
                vis = it.visible.astype(bool)
                layer[vis, :3] = it.image[vis]
                layer[..., 3] = vis.astype(np.uint8) * 255
            else:
                layer[..., :3] = it.image
                layer[..., 3] = 255
            out.append(layer)
        return out


class DecomposerPredictor:
    """A :class:`~reflade.engine.decompose.Decomposer` (a model, ``classical``) through the decomposition API.

    A batch goes in one ``decompose`` call; when the decomposer refuses a prompt (:class:`PromptError`, raised
    before any compute), the batch is retried item by item so that only the refused items are lost.
    """

    def __init__(self, decomposer: Any, name: str, *, steps: int = 20, guidance: float = 1.0):
        self.decomposer = decomposer
        self.name = name
        self.steps = int(steps)
        self.guidance = float(guidance)

    def _call(self, items: Sequence[EvalItem]) -> list[np.ndarray]:
        return self.decomposer.decompose(
            [it.image for it in items],
            [it.prompt for it in items],
            [it.kind for it in items],
            steps=self.steps,
            guidance=self.guidance,
            seeds=[it.seed for it in items],
        )

    def predict(self, items: Sequence[EvalItem]) -> list[np.ndarray | str]:
        if not items:
            return []
        try:
            return list(self._call(items))
        except PromptError:
            if len(items) == 1:
                raise
        out: list[np.ndarray | str] = []
        for it in items:
            try:
                out.append(self._call([it])[0])
            except PromptError as e:
                out.append(f"refused: {e}")
        return out


def build_predictor(
    spec: str,
    registry: Any = None,
    *,
    steps: int = 20,
    guidance: float = 1.0,
    device: str = "cpu",
    cache_dir: str | None = None,
) -> Predictor:
    """The predictor ``spec`` names: ``copy-visible``, ``classical``, or an exact model reference.

    Raises:
        RegistryError: a model reference that does not resolve; ValueError: one that is not a RefLayer model.
    """
    if spec == "copy-visible":
        return CopyVisible()
    if spec == "classical":
        from reflade.engine.classical_decomposer import ClassicalDecomposer

        return DecomposerPredictor(ClassicalDecomposer(), "classical", steps=steps, guidance=guidance)
    from reflade.train.pipeline_reflayer import RefLayerPipeline

    pipe = RefLayerPipeline.from_registry(spec, registry, cache_dir=cache_dir or None, device=device)
    return DecomposerPredictor(pipe, spec, steps=steps, guidance=guidance)
