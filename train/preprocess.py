"""Dataset rows -> the trainer's input: the per-sample decoding a Ray Data ``map`` runs before the trainer
(:func:`preprocess_row`), and a batch of its output as tensors (:func:`batch_to_tensors`).

A row becomes the source image as (3, R, R) in [-1, 1], the layer as straight RGBA (4, R, R) in [0, 1], one of the
row's prompts (drawn by a seed from the row's ``sample_id``) as its canvas (3, R, R) in [-1, 1] and its text, and
the row's layer ``kind`` (foreground or background: both kinds train, each with the model's kind input set to it).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

__all__ = ["batch_to_tensors", "preprocess_row"]


def _plain(value: Any) -> Any:
    """NumPy containers (as Ray Data hands nested columns over) -> plain Python."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_plain(v) for v in value]
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _layer_rgba(layer: np.ndarray, size: int) -> np.ndarray:
    """HxWx4 uint8 straight RGBA -> (4, size, size) float32 straight RGBA in [0, 1] (resized premultiplied)."""
    from reflade.train.vae import layer_to_vae_input

    rgb = (layer_to_vae_input(layer, size).numpy() + 1.0) / 2.0
    alpha = layer[..., 3].astype(np.float32) / 255.0
    if alpha.shape != (size, size):
        import cv2

        shrink = size * size < alpha.size
        alpha = cv2.resize(alpha, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.concatenate([rgb, alpha[None]], axis=0).astype(np.float32)


def preprocess_row(row: dict[str, Any], resolution: int, seed: int = 0) -> dict[str, Any]:
    """One dataset row -> the trainer's input: ``image`` (3,R,R), ``layer`` (4,R,R), ``canvas`` (3,R,R), ``text``
    and ``kind`` (the row's layer kind, ``foreground`` or ``background``: the model's kind input).

    One prompt of the row is chosen by a seed from ``(seed, sample_id)`` (the same one every epoch).

    Raises:
        ValueError: the row's ``kind`` is not a layer kind.
    """
    from reflade.engine.decompose import check_kind
    from reflade.engine.schema import decode_image
    from reflade.train.canvas import canvas_batch
    from reflade.train.vae import image_to_vae_input

    kind = check_kind(row.get("kind"), f"sample {row.get('sample_id', '?')}: kind")
    image = decode_image(bytes(row["image"]), "RGB")
    layer = decode_image(bytes(row["layer"]), "RGBA")
    h, w = image.shape[:2]
    prompts = _plain(row.get("prompts")) or []
    if prompts:
        digest = hashlib.sha256(f"{seed}:{row.get('sample_id', '')}".encode()).digest()
        prompt = dict(prompts[int.from_bytes(digest[:4], "little") % len(prompts)])
    else:
        prompt = {"type": "text", "text": ""}
    known = ("type", "granularity", "points", "box", "mask", "text")
    prompt = {k: prompt.get(k) for k in known if k in prompt}
    if prompt.get("points") is None:
        prompt.pop("points", None)
    canvas = canvas_batch([prompt], h, w, size=(resolution, resolution))[0]
    return {
        "image": image_to_vae_input(image, resolution).numpy(),
        "layer": _layer_rgba(layer, resolution),
        "canvas": canvas.numpy(),
        "text": str(prompt.get("text") or ""),
        "kind": kind,
    }


def batch_to_tensors(
    batch: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str] | None]:
    """A numpy batch (``image``, ``layer``, ``canvas``, ``text``, ``kind``) -> tensors (B,3,R,R), (B,4,R,R),
    (B,3,R,R), the B texts and the B layer kinds (None for a batch without a ``kind`` column)."""

    def t(x):
        if isinstance(x, np.ndarray) and x.dtype == object:
            x = np.stack(list(x))
        elif isinstance(x, np.ndarray) and not x.flags.writeable:
            x = x.copy()  # Ray Data hands over read-only views of Arrow buffers; torch wants writable memory
        return torch.as_tensor(x)

    texts = [str(s) for s in batch["text"]]
    kinds = [str(k) for k in batch["kind"]] if "kind" in batch else None
    return t(batch["image"]).float(), t(batch["layer"]).float(), t(batch["canvas"]).float(), texts, kinds
