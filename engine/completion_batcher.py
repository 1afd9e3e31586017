"""Holes of several Ray Data batches sampled together inside one completion actor.

A neural completion backend samples holes in batches of one sampling side (``backend.sample``); within one call
(``complete_batch``) only the holes of that call's images can share a sampler batch, so a batch of four images
often leaves a side's group part-filled. The staged layout therefore lets one completion actor run several calls
at once (``engine.completion_calls_in_flight``: Ray Data's ``max_concurrent_calls_per_actor`` with true
multi-threading), and every call hands its holes to one :class:`HoleBatcher` of the actor:

- the calls' threads cut their images into holes (``backend.holes``) and queue them, then wait;
- the batcher's own thread groups the queued holes by sampling side, and samples a side's group when it holds
  ``sampler_batch`` holes, or, when no new hole arrived for ``engine.completion_batch_wait_s``, every group it
  holds; it is the only thread that runs the model (the sampler's scheduler holds state);
- each call, once all of its holes are sampled, builds its own images' completions (``backend.assemble``) and
  returns its own rows.

A call returns only its own rows, and only after its holes are sampled, so no row is ever held between calls:
when the stream ends, the last calls' holes are sampled after the wait and those calls return as any other.
Each hole draws its noise from its own generator (seeded by the image, the entity and the hole kind), so a hole's
result does not depend on which holes share its sampler batch (up to float rounding in batched kernels).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


class _Call:
    """One ``complete_batch`` call waiting for its holes: set done when the last is sampled, or on an error."""

    def __init__(self, holes: int):
        self.remaining = holes
        self.error: BaseException | None = None
        self.done = threading.Event()
        if holes == 0:
            self.done.set()

    def sampled(self, n: int) -> None:  # the batcher's thread only
        self.remaining -= n
        if self.remaining <= 0:
            self.done.set()

    def failed(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()


@dataclass
class BatcherStats:
    """What the batcher did: sampler batches run, holes sampled, and the batches that held holes of two or more
    calls (holes carried across Ray Data batches)."""

    sampler_batches: int = 0
    holes: int = 0
    shared_batches: int = 0


class HoleBatcher:
    """One completion actor's sampler, shared by its calls in flight (see the module docstring).

    Args:
        backend: a neural completion backend with ``holes(i, image, entities)``, ``sample(images, holes, side)``,
            ``assemble(image, entities, holes)`` and ``sampler_batch`` (:class:`.backends.neural_completion.
            NeuralCompletionBackend` and its subclasses).
        wait_s: seconds without a new hole after which part-filled groups are sampled (> 0).

    Raises:
        ValueError: ``wait_s`` is not positive, or the backend lacks the hole steps.
    """

    def __init__(self, backend: Any, wait_s: float):
        if not wait_s > 0:
            raise ValueError(f"engine.completion_batch_wait_s must be > 0 seconds, not {wait_s}")
        missing = [m for m in ("holes", "sample", "assemble", "sampler_batch") if not hasattr(backend, m)]
        if missing:
            raise ValueError(
                f"{type(backend).__name__} cannot batch holes across calls: no {', '.join(missing)}"
            )
        self.backend = backend
        self.wait_s = float(wait_s)
        self.max_batch = int(backend.sampler_batch)
        self.stats = BatcherStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hole-batcher", daemon=True)
        self._thread.start()

    def complete_batch(self, images: list[np.ndarray], entities_list: list[list[Any]]) -> list[list[Any]]:
        """``backend.complete_batch`` with this call's holes sampled beside those of the other calls in flight.

        Args:
            images: HxWx3 uint8 RGB images.
            entities_list: per image, its stage-2 entities.

        Returns:
            Per image, one completion per entity (as ``backend.complete_batch``).

        Raises:
            ValueError: the lists differ in length, or an image or mask is malformed (from ``backend.holes``).
            Exception: whatever sampling raised for a sampler batch holding one of this call's holes.
        """
        if len(images) != len(entities_list):
            raise ValueError(f"{len(images)} images but {len(entities_list)} entity lists")
        holes = []
        for i, (image, entities) in enumerate(zip(images, entities_list, strict=True)):
            holes += self.backend.holes(i, image, entities)
        call = _Call(len(holes))
        for h in holes:
            self._queue.put((call, images[h.image], h))
        call.done.wait()
        if call.error is not None:
            raise call.error
        return [
            self.backend.assemble(image, entities, [h for h in holes if h.image == i])
            for i, (image, entities) in enumerate(zip(images, entities_list, strict=True))
        ]

    def _run(self) -> None:
        groups: dict[int, list[tuple[_Call, np.ndarray, Any]]] = {}
        while True:
            try:
                item = self._queue.get(timeout=self.wait_s) if groups else self._queue.get()
            except queue.Empty:  # no new hole for wait_s: nothing will fill the groups soon
                for side in sorted(groups):
                    self._sample(side, groups.pop(side))
                continue
            side = item[2].side
            group = groups.setdefault(side, [])
            group.append(item)
            if len(group) >= self.max_batch:
                self._sample(side, groups.pop(side))

    def _sample(self, side: int, items: list[tuple[_Call, np.ndarray, Any]]) -> None:
        try:
            self.backend.sample([image for _, image, _ in items], [h for _, _, h in items], side)
        except BaseException as e:  # noqa: BLE001 - handed to every call with a hole here; the thread lives on
            for call, _, _ in items:
                call.failed(e)
            return
        calls: dict[int, tuple[_Call, int]] = {}
        for call, _, _ in items:
            calls[id(call)] = (call, calls.get(id(call), (call, 0))[1] + 1)
        self.stats.sampler_batches += 1
        self.stats.holes += len(items)
        self.stats.shared_batches += len(calls) > 1
        for call, n in calls.values():
            call.sampled(n)
