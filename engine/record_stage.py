"""One image record on its way through the stages, and the one Ray Data adapter that runs a stage over records.

A record is a row of a pandas batch: ``source_id``, ``sha256``, ``name``, ``ok``/``stage``/``reason`` (its
quarantine state) and ``work``, the :class:`Work` of the image. Between processes ``work`` travels pickled; inside
one process (the fused layout) it stays the object. :class:`RecordStage` owns the per-record loop once: skip the
quarantined, take the ``Work``, time the stage, quarantine the record on an error, hand the ``Work`` on.
Counting is each stage's (``count``), because its unit differs (images or layers).
"""

from __future__ import annotations

import abc
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LayerOut:
    """One layer produced for an image (kept or rejected)."""

    entity_id: int
    kind: str
    category: str
    rgba: np.ndarray | None = None
    visible_mask: np.ndarray | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    stage: str = ""
    reason: str = ""

    def reject(self, stage: str, reason: str) -> None:
        self.ok, self.stage, self.reason = False, stage, reason


@dataclass
class Work:
    """Everything known about one image as it goes through the stages (pickled between Ray stages)."""

    image: np.ndarray | None = None
    image_png: bytes = b""
    entities: list[Any] = field(default_factory=list)
    completions: list[Any] = field(default_factory=list)
    layers: list[LayerOut] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    # stage -> [units in, units out]; units are images for prefilter/dedup/scene, layers after.
    counts: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def count(work: Work, stage: str, n_in: int, n_out: int) -> None:
    """Add ``n_in`` units in and ``n_out`` units out to ``work``'s counts for ``stage``."""
    c = work.counts.setdefault(stage, [0, 0])
    c[0] += n_in
    c[1] += n_out


def error_reason(e: BaseException) -> str:
    """The quarantine reason of an unexpected error (reason code ``error``)."""
    return f"error: {type(e).__name__}: {e}"


def quarantine(r: dict[str, Any], stage: str, reason: str) -> None:
    """Take record ``r`` out of the run at ``stage`` (``reason``: ``code: words``)."""
    r.update(ok=False, stage=stage, reason=reason)


def to_records(batch) -> list[dict[str, Any]]:
    """A pandas batch as a list of record dicts."""
    return batch.to_dict("records")


def to_batch(rows: list[dict[str, Any]]):
    """Record dicts as a pandas batch (what ``map_batches(batch_format="pandas")`` hands back to Ray)."""
    import pandas as pd

    return pd.DataFrame(rows)


def load_work(work) -> Work:
    """A record's ``work``: pickled bytes between processes, the object itself inside one process."""
    return work if isinstance(work, Work) else pickle.loads(work)


class RecordStage(abc.ABC):
    """A stage over image records, called by Ray Data on a pandas batch (a task's callable, or an actor).

    Subclasses set ``stage`` and implement :meth:`process`; :meth:`__call__` is the loop, written once: for each
    record still in the run (:meth:`accepts`), take its ``Work`` (:meth:`open`), time :meth:`process`, quarantine
    the record with the error if it raises (one bad image never stops the run), call :meth:`close` (counts that
    must be taken whatever happened), and hand the ``Work`` on (:meth:`hand_on`).

    Attributes:
        stage: the stage's name, in counts, timings and quarantine reasons.
        pickle_out: hand ``Work`` on pickled (the next stage may be in another process); ``LayerStages`` turns it
            off for all but its last stage, so that the object goes from stage to stage in one process.
        timed: record the stage's time in ``Work.timings``.
    """

    stage = ""
    pickle_out = True
    timed = True

    def __call__(self, batch):
        rows = to_records(batch)
        for r in rows:
            if self.accepts(r):
                self.run_one(r)
        return to_batch(rows)

    def run_one(self, r: dict[str, Any]) -> None:
        """The stage on one record (mutates ``r``; ``r["work"]`` is replaced by the handed-on ``Work``)."""
        work = self.open(r)
        t0 = time.perf_counter()
        try:
            self.process(r, work)
        except Exception as e:  # one bad image is quarantined with the error, the run goes on
            quarantine(r, self.stage, error_reason(e))
        self.close(r, work)
        if self.timed:
            work.timings[self.stage] = work.timings.get(self.stage, 0.0) + time.perf_counter() - t0
        r["work"] = self.hand_on(work)

    def accepts(self, r: dict[str, Any]) -> bool:
        """Whether the stage runs on record ``r`` (default: those not quarantined)."""
        return bool(r["ok"])

    def open(self, r: dict[str, Any]) -> Work:
        """The record's ``Work`` (default: the one the previous stage handed on)."""
        return load_work(r["work"])

    @abc.abstractmethod
    def process(self, r: dict[str, Any], work: Work) -> None:
        """Run the stage on one record (mutates ``r`` and ``work``); raising quarantines the record."""

    def close(self, r: dict[str, Any], work: Work) -> None:  # noqa: B027 - an optional hook, not abstract
        """After :meth:`process`, whether or not it raised (default: nothing)."""

    def hand_on(self, work: Work):
        """``work`` as the next stage takes it: pickled, or the object itself (``pickle_out`` off)."""
        return pickle.dumps(work) if self.pickle_out else work
