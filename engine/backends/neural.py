"""The ``neural`` backends of stages 2 and 3, by module:

- :mod:`.neural_models`: the configured weights (:func:`weights_refs`), where they come from (the registry's
  local cache, or ``engine.weights_dir``), the device, the loaders (SAM, OWLv2, BLIP, RePaint).
- :mod:`.neural_scene`: :class:`NeuralSceneBackend`, OWLv2 + SAM (stage 2).
- :mod:`.neural_captioner`: :class:`NeuralCaptioner`, BLIP captions of entity crops (stage 2).
- :mod:`.neural_completion`: :class:`NeuralCompletionBackend`, RePaint (stage 3), and the hole primitives
  (holes, sampling sides, sampling, paste) that :mod:`.sd3_inpaint` shares.

This module hands on their public names, so ``from reflade.engine.backends.neural import NeuralSceneBackend`` keeps
working.
"""

from __future__ import annotations

from reflade.engine.backends.neural_captioner import NeuralCaptioner, caption_crop
from reflade.engine.backends.neural_completion import (
    SAMPLER_BATCH,
    Hole,
    NeuralCompletionBackend,
    paste,
    sampling_side,
    unet_side_multiple,
)
from reflade.engine.backends.neural_models import (
    DEFAULT_CAPTIONER_WEIGHTS,
    DEFAULT_COMPLETION_WEIGHTS,
    DEFAULT_DETECTOR_WEIGHTS,
    DEFAULT_SAM_WEIGHTS,
    DEFAULT_VOCABULARY,
    WeightsSource,
    build_sam,
    default_cache_dir,
    load_blip,
    load_owlv2,
    load_repaint,
    load_sam,
    select_device,
    weights_refs,
)
from reflade.engine.backends.neural_scene import SOURCE, NeuralSceneBackend

__all__ = [
    "DEFAULT_CAPTIONER_WEIGHTS",
    "DEFAULT_COMPLETION_WEIGHTS",
    "DEFAULT_DETECTOR_WEIGHTS",
    "DEFAULT_SAM_WEIGHTS",
    "DEFAULT_VOCABULARY",
    "SAMPLER_BATCH",
    "SOURCE",
    "Hole",
    "NeuralCaptioner",
    "NeuralCompletionBackend",
    "NeuralSceneBackend",
    "WeightsSource",
    "build_sam",
    "caption_crop",
    "default_cache_dir",
    "load_blip",
    "load_owlv2",
    "load_repaint",
    "load_sam",
    "paste",
    "sampling_side",
    "select_device",
    "unet_side_multiple",
    "weights_refs",
]
