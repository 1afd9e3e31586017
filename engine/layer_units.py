"""Stage 4 of the staged layout, one entity per call: an image's layers are matted in parallel.

Matting is CPU work per entity, and an image holds up to ``max_entities`` of them; one actor call per image would
matte them one after another while other actors of the pool idle. So the staged layout cuts each image record into
units before matting and puts them back together after it:

1. :func:`split_layers` (a task): each image record still in the run becomes one row per entity, a
   :class:`LayerUnit` (the image, the entity, its completion) in ``work``, with ``unit`` (its index) and ``units``
   (how many the image has); the first unit also carries the image's own ``Work``. Any other record passes
   through as one row with ``units`` 0. The rows are then cut into blocks of one row each
   (``Dataset.repartition(target_num_rows_per_block=1)``, a streaming operator), so that each unit is its own task.
2. :class:`LayerMattingStage` (the matting actor pool): one unit per call, :meth:`MattingStage.matte`; the record
   loop of :class:`~reflade.engine.record_stage.RecordStage` times it into the unit and quarantines the unit on an
   error, as it does images.
3. :class:`GatherLayers` (ONE actor): holds an image's units until all ``units`` of them have arrived, then hands
   on the image record as the stage before matting would have (layers in entity order, the matting time summed
   over its units, the counts, the quarantine of an image whose unit failed). Every unit reaches this one actor,
   and the call that brings an image's last unit hands the image on, so nothing is held when the stream ends: no
   end-of-stream hook is needed. A unit delivered twice (a retried task) replaces its copy, or is dropped once
   its image has left (the actor keeps the keys of the images it handed on).

What this costs: one more actor (``GATHER_CPUS``) and a task per unit. If the gathering actor itself dies, the
units it held are lost (Ray restarts it and retries only its call in flight): those images reach no shard, the
commit's count check (images in = kept + quarantined) fails the run, and a re-run redoes just them (their sources
have no marker). The fused layout and the plain loop keep matting an image's entities in sequence
(:class:`MattingStage`): their batch never leaves one process, which is their point.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reflade.engine.ray_stages import MattingStage
from reflade.engine.record_stage import (
    LayerOut,
    Work,
    count,
    error_reason,
    load_work,
    quarantine,
    to_batch,
    to_records,
)

GATHER_CPUS = 0.1
"""CPUs reserved by the gathering actor: it only unpickles and re-pickles records, and a 2-CPU node must still fit
the three model pools and the tasks beside it."""


@dataclass
class LayerUnit:
    """One entity of an image on its way through the matting pool.

    Attributes:
        image: HxWx3 uint8 RGB (dropped once matted).
        entity: the stage-2 entity.
        completion: its stage-3 completion (dropped once matted).
        work: the image's ``Work`` (its completions dropped), on the image's first unit only.
        layers: the entity's foreground and background layers, once matted.
        timings: seconds per stage spent on this unit (``matting``).
    """

    image: np.ndarray | None
    entity: Any
    completion: Any
    work: Work | None = None
    layers: list[LayerOut] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def split_layers(batch):
    """Image records -> one row per entity of each image still in the run (``unit``, ``units``, ``work``: a
    pickled :class:`LayerUnit`); other records pass through with ``unit`` and ``units`` 0. An image whose
    completions do not match its entities is quarantined here (as the sequential stage would, at matting)."""
    out = []
    for r in to_records(batch):
        if not r["ok"]:
            out.append(dict(r, unit=0, units=0))
            continue
        work = load_work(r["work"])
        try:
            pairs = list(zip(work.entities, work.completions, strict=True))
        except ValueError as e:
            quarantine(r, "matting", error_reason(e))
            out.append(dict(r, unit=0, units=0))
            continue
        if not pairs:  # nothing to matte: the stage's result is known here
            work.layers, work.completions = [], []
            count(work, "matting", 0, 0)
            out.append(dict(r, work=pickle.dumps(work), unit=0, units=0))
            continue
        work.completions = []  # each unit carries its own
        for k, (ent, comp) in enumerate(pairs):
            unit = LayerUnit(work.image, ent, comp, work=work if k == 0 else None)
            # The image array is pickled once per unit (on the first, once for the unit and its Work).
            out.append(dict(r, work=pickle.dumps(unit), unit=k, units=len(pairs)))
    return to_batch(out)


class LayerMattingStage(MattingStage):
    """Stage 4 on one :class:`LayerUnit` per record (the staged layout's matting pool; see the module
    docstring). Records with ``units`` 0 are not units: they pass untouched."""

    def accepts(self, r):
        return bool(r["ok"]) and int(r["units"]) > 0

    def process(self, r, unit: LayerUnit):
        unit.layers = self.matte(unit.image, unit.entity, unit.completion)
        unit.image = unit.completion = None  # the first unit's Work still holds the image


class GatherLayers:
    """Units back into image records (ONE actor; see the module docstring). Records that are not units pass
    through; an image's record leaves with the call that brings its last unit."""

    def __init__(self):
        self.pending: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
        self.done: set[tuple[str, str]] = set()  # images handed on: a late copy of their unit is dropped

    def __call__(self, batch):
        out = []
        for r in to_records(batch):
            units = int(r.pop("units"))
            k = int(r.pop("unit"))
            if units == 0:
                out.append(r)
                continue
            key = (r["source_id"], r["sha256"])
            if key in self.done:
                continue
            parts = self.pending.setdefault(key, {})
            parts[k] = r  # a unit delivered twice (a retried task) replaces its copy
            if len(parts) == units:
                del self.pending[key]
                self.done.add(key)
                out.append(self.gather([parts[i] for i in range(units)]))
        if not out:  # every unit of this call waits for others: an empty batch, with the records' columns
            import pandas as pd

            return pd.DataFrame(columns=[c for c in batch.columns if c not in ("unit", "units")])
        return to_batch(out)

    @staticmethod
    def gather(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The image record from its unit rows, in unit order: what :class:`MattingStage` would have handed on."""
        units = [pickle.loads(r["work"]) for r in rows]
        work = units[0].work
        r = dict(rows[0])
        seconds = sum(u.timings.get("matting", 0.0) for u in units)
        work.timings["matting"] = work.timings.get("matting", 0.0) + seconds
        failed = [u for u in rows if not u["ok"]]
        if failed:  # as the sequential stage: the first error quarantines the image, no layer is kept
            quarantine(r, failed[0]["stage"], failed[0]["reason"])
        else:
            work.layers = [lay for u in units for lay in u.layers]
            count(work, "matting", len(work.layers), sum(lay.ok for lay in work.layers))
        r["work"] = pickle.dumps(work)
        return r
