"""Training checkpoints: ``state.pt`` with the trainable model's weights, the optimiser, the step, the EMA
weights and the settings (:func:`_save_state`; rank 0 writes it), read back safely (:func:`_load_state`,
``torch.load(weights_only=True)``), and the newest ``checkpoint-<step>-*`` folder of a run in the object store
(:func:`_latest_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from reflade.platform.errors import ReportedError
from reflade.train.config import TrainSettings

__all__ = ["CheckpointError"]

_STATE = "state.pt"
_CKPT_PREFIX = "checkpoint-"


class CheckpointError(ReportedError, RuntimeError):
    """A checkpoint's ``state.pt`` cannot be loaded safely (or is not a training state)."""


_STATE_KEYS = ("model", "optimizer", "step", "ema", "settings")


def _save_state(
    folder: str, model: nn.Module, optimizer, step: int, ema, settings: TrainSettings, extra=None
) -> None:
    """Write ``state.pt``: tensors, numbers, strings and plain containers only, so that :func:`_load_state`
    reads it back with ``weights_only=True``."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "ema": ema,
            "settings": settings.to_dict(),
            **(extra or {}),
        },
        os.path.join(folder, _STATE),
    )


def _load_state(
    folder: str | os.PathLike, map_location: Any = "cpu", where: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint's ``state.pt`` with ``torch.load(weights_only=True)``.

    Anyone who can write to the bucket can write a checkpoint: a full unpickler would run whatever code a planted
    ``state.pt`` names on every worker that resumes from it. The restricted unpickler accepts tensors, numbers,
    strings, ``None`` and plain containers (all a training state holds) and refuses anything else.

    Args:
        folder: the checkpoint's local folder.
        map_location: where the tensors go (``torch.load``'s argument).
        where: the checkpoint's name for messages (default: ``folder``).

    Raises:
        CheckpointError: the file is missing, holds other objects than those, or lacks a training state's keys.
    """
    import pickle

    path = os.path.join(folder, _STATE)
    where = where or str(folder)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {where} has no {_STATE}") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {_STATE} of checkpoint {where}: it holds objects other than tensors, numbers, "
            f"strings and plain containers, which a training state never does ({first}). Someone other than "
            "`reflade train` wrote it: check who can write to the bucket, and remove the checkpoint."
        ) from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{_STATE} of checkpoint {where} is not a training state (missing {missing})")
    return state


def _latest_checkpoint(storage, run_path: str):
    """The newest ``checkpoint-<step>-*`` folder of a run in the object store, as a Ray Checkpoint (or None)."""
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    try:
        infos = storage.fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return None
    dirs = [
        i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(_CKPT_PREFIX)
    ]
    if not dirs:
        return None

    def step_of(p: str) -> int:
        try:
            return int(p.rsplit("/", 1)[-1][len(_CKPT_PREFIX) :].split("-")[0])
        except ValueError:
            return -1

    best = max(dirs, key=step_of)
    return Checkpoint(path=best, filesystem=storage.fs)
