"""The data-engine run: raw images -> six stages on Ray Data -> staged shards -> a registered dataset version.

Exactly-once (design.md, "Data"):
- ``sample_id`` = hash(source sha256, entity id, kind, engine config hash): deterministic;
- a run lives under ``runs/engine/<dataset>/<run-id>/`` where the run id hashes the dataset name, the input's
  content, the engine configuration and the backends: the same command run again finds the same run;
- each batch of images is written as one layer shard, one quarantine shard and, last, one ``done`` marker, all
  named by the hash of the source ids they hold; a re-run skips the source ids that have a marker, and a shard
  without a marker (a writer killed between its files) is ignored and redone;
- the dataset version is registered only at commit, from the marked shards, after the counts balance:
  images in = images kept + images quarantined, layers out = layers kept + layers rejected.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import hashlib
import json
import pickle
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflade.engine.config import EngineConfig
from reflade.engine.schema import (
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    decode_image,
    encode_png,
    make_sample_id,
    rows_to_table,
)
from reflade.platform.errors import ReportedError
from reflade.platform.worker import storage_fields as _storage_fields
from reflade.platform.worker import worker_registry, worker_storage

ENGINE_VERSION = "0.1.0"
STAGES = ("prefilter", "dedup", "scene", "completion", "matting", "prompts", "postfilter")
IMAGE_STAGES = ("prefilter", "dedup", "scene")
# The paper's figures, printed beside ours.
PAPER_PREFILTER_PASS = 0.861
PAPER_END_TO_END = 0.70


class EngineError(ReportedError, RuntimeError):
    """The run cannot go on or its counts do not balance."""


def split_for(sha256: str, test_fraction: float) -> str:
    """Deterministic split of a source image: its layers all go to the same split."""
    return "test" if int(sha256[:8], 16) / 0xFFFFFFFF < test_fraction else "train"


def shard_name(source_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(source_ids)).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------- work items
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


def _count(work: Work, stage: str, n_in: int, n_out: int) -> None:
    c = work.counts.setdefault(stage, [0, 0])
    c[0] += n_in
    c[1] += n_out


def _rows(batch) -> list[dict[str, Any]]:
    return batch.to_dict("records")


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd

    return pd.DataFrame(rows)


def _load(work) -> Work:
    """A record's ``work``: pickled bytes between processes, the object itself inside ``LayerStages``."""
    return work if isinstance(work, Work) else pickle.loads(work)


class _Handoff:
    """How a stage hands its ``Work`` on: pickled (``pickle_out``, the default: the next stage may be in another
    process) or as the object (inside one process: ``LayerStages`` turns it off for all but its last stage)."""

    pickle_out = True

    def _dump(self, work: Work):
        return pickle.dumps(work) if self.pickle_out else work


# ---------------------------------------------------------------------------------------------- stages
class ReadRaw:
    """Fetch each input's bytes from the bucket (credentials from the worker's own environment)."""

    def __init__(self, storage_fields: dict[str, Any]):
        self.fields = storage_fields

    @property
    def storage(self):
        return worker_storage(self.fields)

    def __call__(self, batch):
        rows = _rows(batch)
        for r in rows:
            try:
                r["data"], _ = self.storage.get_bytes(r["key"])
            except Exception as e:  # a missing raw object is quarantined, not fatal
                r["data"] = b""
                r.update(ok=False, stage="read", reason=f"unreadable: {type(e).__name__}: {e}")
        return _frame(rows)


class PreFilterStage:
    """Stage 1: decode safely and reject unsuitable images, with a reason."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def __call__(self, batch):
        from reflade.engine.stages.prefilter import decode_and_check

        rows = _rows(batch)
        for r in rows:
            work = Work()
            t0 = time.perf_counter()
            if r["ok"]:
                try:
                    d = decode_and_check(r["data"], self.cfg, r["name"])
                except Exception as e:  # never crash the run on one input
                    d = None
                    r.update(ok=False, stage="prefilter", reason=f"error: {type(e).__name__}: {e}")
                if d is not None:
                    work.scores.update(d.scores)
                    r["phash"] = str(d.phash or 0)
                    if d.ok:
                        work.image_png = d.image_png
                    else:
                        r.update(ok=False, stage="prefilter", reason=d.reason or "rejected")
            _count(work, "prefilter", 1, int(r["ok"]))
            work.timings["prefilter"] = time.perf_counter() - t0
            r.setdefault("phash", "0")
            r["phash"] = str(r.get("phash") or "0")
            r["data"] = b""
            r["work"] = pickle.dumps(work)
        return _frame(rows)


class MarkDuplicates:
    """Stage 1b: near-duplicates (perceptual hash) found over the whole input are quarantined."""

    def __init__(self, duplicates: dict[str, str]):
        self.duplicates = duplicates

    def __call__(self, batch):
        rows = _rows(batch)
        for r in rows:
            work: Work = pickle.loads(r["work"])
            if r["ok"]:
                kept = self.duplicates.get(r["source_id"])
                if kept:
                    r.update(ok=False, stage="dedup", reason=f"duplicate_of: near-duplicate of {kept}")
                _count(work, "dedup", 1, int(r["ok"]))
                r["work"] = pickle.dumps(work)
        return _frame(rows)


class _ModelStage(_Handoff, abc.ABC):
    """A stage that holds a backend (an actor in a Ray Data actor pool). Backends that load weights read them
    from the driver's registry (``storage_fields`` and ``registry_prefix``, no credentials)."""

    stage = ""

    def __init__(
        self,
        family: str,
        cfg: EngineConfig,
        storage_fields: dict[str, Any] | None = None,
        registry_prefix: str | None = None,
    ):
        self.family = family
        self.cfg = cfg
        self.registry = worker_registry(storage_fields, registry_prefix) if family == "neural" else None
        self.backend = self.make_backend()

    @abc.abstractmethod
    def make_backend(self):
        """The stage's backend, built once per actor."""

    def _batched(self, batch, run, apply):
        """Run the whole batch through one backend call, ``run(works) -> results``, then ``apply(r, work, result)``
        per image; with fewer than two live images, or when that call fails, each image runs alone (so only a bad
        one is quarantined, with its error)."""
        rows = _rows(batch)
        live = [(r, _load(r["work"])) for r in rows if r["ok"]]
        if len(live) < 2:
            return _ModelStage.__call__(self, batch)
        t0 = time.perf_counter()
        try:
            results = run([w for _, w in live])
        except Exception:  # noqa: BLE001 - retried image by image, where the error is recorded
            return _ModelStage.__call__(self, batch)
        share = (time.perf_counter() - t0) / len(live)  # the batch's time, split evenly between its images
        for (r, work), result in zip(live, results, strict=True):
            apply(r, work, result)
            work.timings[self.stage] = work.timings.get(self.stage, 0.0) + share
            r["work"] = self._dump(work)
        return _frame(rows)

    @abc.abstractmethod
    def process(self, r: dict[str, Any], work: Work) -> None:
        """Run the stage on one image record (mutates ``r`` and ``work``)."""

    def __call__(self, batch):
        rows = _rows(batch)
        for r in rows:
            if not r["ok"]:
                continue
            work: Work = _load(r["work"])
            t0 = time.perf_counter()
            try:
                self.process(r, work)
            except Exception as e:  # one bad image is quarantined with the error, the run goes on
                r.update(ok=False, stage=self.stage, reason=f"error: {type(e).__name__}: {e}")
            work.timings[self.stage] = work.timings.get(self.stage, 0.0) + time.perf_counter() - t0
            r["work"] = self._dump(work)
        return _frame(rows)


class SceneStage(_ModelStage):
    """Stage 2: candidate entities with masks, labels, occlusion order (and captions, neural backend).

    A backend with ``detect_batch`` (neural) gets every image of the batch in one call, so that its models
    (detector, SAM encoder, the captioner over every entity of the batch) run batched; when that call fails,
    each image runs alone, so that only a bad one is quarantined (as in :class:`CompletionStage`)."""

    stage = "scene"

    def make_backend(self):
        from reflade.engine.backends import make_scene_backend

        return make_scene_backend(self.family, self.cfg, self.registry)

    def process(self, r, work):
        work.image = decode_image(work.image_png, "RGB")
        self._found(r, work, self.backend.detect(work.image))

    def _found(self, r, work, entities) -> None:
        work.entities = entities
        _count(work, "scene", 1, int(bool(work.entities)))
        if not work.entities:
            r.update(ok=False, stage="scene", reason="no_entities: no candidate entity found")

    def __call__(self, batch):
        detect_batch = getattr(self.backend, "detect_batch", None)
        if detect_batch is None:
            return super().__call__(batch)

        def run(works):
            images = [decode_image(w.image_png, "RGB") for w in works]
            return list(zip(images, detect_batch(images), strict=True))

        def apply(r, work, found):
            work.image = found[0]
            self._found(r, work, found[1])

        return self._batched(batch, run, apply)


class CompletionStage(_ModelStage):
    """Stage 3: amodal completion of each entity and the background with it removed."""

    stage = "completion"

    def make_backend(self):
        from reflade.engine.backends import make_completion_backend

        return make_completion_backend(self.family, self.cfg, self.registry)

    def process(self, r, work):
        work.completions = self.backend.complete(work.image, work.entities)
        n = len(work.entities)
        _count(work, "completion", 2 * n, 2 * len(work.completions))

    def __call__(self, batch):
        """Backends with ``complete_batch`` (neural) get every image of the batch at once, so that holes of the
        same sampling side share sampler batches across images; if that call fails, each image runs alone so
        that only a bad one is quarantined."""
        complete_batch = getattr(self.backend, "complete_batch", None)
        if complete_batch is None:
            return super().__call__(batch)

        def apply(r, work, completions):
            work.completions = completions
            _count(work, "completion", 2 * len(work.entities), 2 * len(completions))

        return self._batched(
            batch, lambda works: complete_batch([w.image for w in works], [w.entities for w in works]), apply
        )


class MattingStage(_ModelStage):
    """Stage 4: mask refinement, alpha matting and foreground colours at soft edges."""

    stage = "matting"

    def make_backend(self):
        from reflade.engine.backends import make_matting_backend

        return make_matting_backend(self.family, self.cfg, self.registry)

    def process(self, r, work):
        layers = []
        for ent, comp in zip(work.entities, work.completions, strict=True):
            fg = LayerOut(ent.entity_id, "foreground", ent.label, visible_mask=ent.mask)
            try:
                fg.rgba = self.backend.refine(work.image, comp, ent.mask)
                fg.scores.update(comp.scores)
            except Exception as e:
                fg.ok, fg.stage, fg.reason = False, "matting", f"error: {type(e).__name__}: {e}"
            bg_rgba = np.dstack([comp.background, np.full(comp.background.shape[:2], 255, np.uint8)])
            bg = LayerOut(ent.entity_id, "background", ent.label, rgba=bg_rgba, visible_mask=~ent.mask)
            layers += [fg, bg]
        work.layers = layers
        _count(work, "matting", len(layers), sum(lay.ok for lay in layers))
        work.completions = []  # no longer needed: keep the pickles small


class PromptStage(_Handoff):
    """Stage 5: spatial, textual and mixed prompts at two granularities for every layer."""

    stage = "prompts"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def __call__(self, batch):
        from reflade.engine.stages.prompts import caption_text, make_prompts

        rows = _rows(batch)
        for r in rows:
            if not r["ok"]:
                continue
            work: Work = _load(r["work"])
            t0 = time.perf_counter()
            by_id = {e.entity_id: e for e in work.entities}
            n_in = sum(lay.ok for lay in work.layers)
            for lay in work.layers:
                if not lay.ok:
                    continue
                rng = np.random.default_rng(
                    int(r["sha256"][:12], 16) + 7919 * lay.entity_id + (lay.kind == "background")
                )
                try:
                    ent = by_id[lay.entity_id]
                    lay.prompts = make_prompts(
                        ent, ent.mask, work.image.shape[:2], rng, self.cfg, kind=lay.kind
                    )
                    if ent.caption is not None:  # 1: the fine text is the captioner's; 0: the template's
                        lay.scores["caption_used"] = float(caption_text(ent, lay.kind) is not None)
                    if not lay.prompts:
                        lay.ok, lay.stage, lay.reason = False, "prompts", "no_prompts: none could be made"
                except Exception as e:
                    lay.ok, lay.stage, lay.reason = False, "prompts", f"error: {type(e).__name__}: {e}"
            _count(work, "prompts", n_in, sum(lay.ok for lay in work.layers))
            work.timings["prompts"] = time.perf_counter() - t0
            r["work"] = self._dump(work)
        return _frame(rows)


class PostFilterStage(_Handoff):
    """Stage 6: reject layers that fail fidelity checks; an image with no layer left is quarantined."""

    stage = "postfilter"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def __call__(self, batch):
        from reflade.engine.stages.postfilter import check_layer

        rows = _rows(batch)
        for r in rows:
            if not r["ok"]:
                continue
            work: Work = _load(r["work"])
            t0 = time.perf_counter()
            n_in = sum(lay.ok for lay in work.layers)
            for lay in work.layers:
                if not lay.ok:
                    continue
                try:
                    v = check_layer(lay.rgba, work.image, lay.visible_mask, lay.kind, self.cfg)
                    lay.scores.update(v.scores)
                    if not v.ok:
                        lay.ok, lay.stage, lay.reason = False, "postfilter", v.reason or "rejected"
                except Exception as e:
                    lay.ok, lay.stage, lay.reason = False, "postfilter", f"error: {type(e).__name__}: {e}"
            kept = sum(lay.ok for lay in work.layers)
            _count(work, "postfilter", n_in, kept)
            if kept == 0:
                r.update(
                    ok=False, stage="postfilter", reason="all_layers_rejected: no layer passed the checks"
                )
            work.timings["postfilter"] = time.perf_counter() - t0
            r["work"] = self._dump(work)
        return _frame(rows)


class ShardWriter:
    """Write one batch of images as a layer shard, a quarantine shard and a ``done`` marker (last)."""

    def __init__(
        self,
        storage_fields: dict[str, Any],
        run_prefix: str,
        config_hash: str,
        backends: dict[str, str],
        weights: list[str],
        test_fraction: float,
    ):
        self.fields = storage_fields
        self.run_prefix = run_prefix
        self.config_hash = config_hash
        self.backends = backends
        self.weights = weights
        self.test_fraction = test_fraction

    @property
    def storage(self):
        return worker_storage(self.fields)

    def __call__(self, batch):
        rows = _rows(batch)
        if not rows:
            return _frame([])
        layer_rows, quarantine, counts, timings = [], [], defaultdict(lambda: [0, 0]), defaultdict(float)
        for r in rows:
            work: Work = pickle.loads(r["work"]) if isinstance(r.get("work"), bytes) and r["work"] else Work()
            for stage, (a, b) in work.counts.items():
                counts[stage][0] += a
                counts[stage][1] += b
            for stage, secs in work.timings.items():
                timings[stage] += secs
            split = split_for(r["sha256"], self.test_fraction)
            for lay in work.layers:
                sid = make_sample_id(r["sha256"], lay.entity_id, lay.kind, self.config_hash)
                if lay.ok and r["ok"]:
                    layer_rows.append(self._row(r, work, lay, sid, split))
                elif not lay.ok:
                    quarantine.append(self._q(r, lay.stage, lay.reason, lay.entity_id, lay.kind, sid))
            if not r["ok"]:
                quarantine.append(self._q(r, r["stage"], r["reason"], None, None, None))
        name = shard_name([r["source_id"] for r in rows])
        self._write(name, layer_rows, quarantine)
        summary = {
            "shard": name,
            "images": len(rows),
            "images_kept": sum(bool(r["ok"]) for r in rows),
            "layers_kept": len(layer_rows),
            "layers_rejected": sum(1 for q in quarantine if q["entity_id"] is not None),
            "source_ids": [r["source_id"] for r in rows],
            "counts": dict(counts),
            "timings": dict(timings),
        }
        # The marker goes last: its presence means both shards are complete.
        self.storage.put_json(f"{self.run_prefix}done/{name}.json", summary)
        return _frame([{"shard": name, "summary": json.dumps(summary)}])

    def _row(self, r, work, lay: LayerOut, sid: str, split: str) -> dict[str, Any]:
        h, w = work.image.shape[:2]
        return {
            "schema_version": SCHEMA_VERSION,
            "sample_id": sid,
            "source_id": r["source_id"],
            "source_sha256": r["sha256"],
            "image": work.image_png,
            "width": w,
            "height": h,
            "layer": encode_png(lay.rgba),
            "visible_mask": encode_png(lay.visible_mask),
            "kind": lay.kind,
            "category": lay.category,
            "prompts": lay.prompts,
            "split": split,
            "scores": {**work.scores, **lay.scores},
            "provenance": {
                "engine_version": ENGINE_VERSION,
                "config_hash": self.config_hash,
                "backends": self.backends,
                "weights": self.weights,
            },
        }

    @staticmethod
    def _q(r, stage, reason, entity_id, kind, sample_id) -> dict[str, Any]:
        reason = reason or ""
        return {
            "source_id": r["source_id"],
            "source_sha256": r["sha256"],
            "name": r["name"],
            "stage": stage or "",
            "reason_code": reason.split(":", 1)[0],
            "reason": reason,
            "entity_id": entity_id,
            "kind": kind,
            "sample_id": sample_id,
        }

    def _write(self, name: str, layer_rows: list[dict[str, Any]], quarantine: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs = self.storage.fs
        table = rows_to_table(layer_rows, validate=True)
        pq.write_table(
            table,
            self.storage.path(f"{self.run_prefix}staged/{name}.parquet"),
            filesystem=fs,
            compression="zstd",
        )
        qt = pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
        pq.write_table(qt, self.storage.path(f"{self.run_prefix}quarantine/{name}.parquet"), filesystem=fs)


# ---------------------------------------------------------------------------------------------- synthetic rows
def synthetic_rows(
    scene, scene_id: str, config_hash: str, split: str, cfg: EngineConfig
) -> list[dict[str, Any]]:
    """Rows with exact ground truth from one synthetic scene (foreground and background per object)."""
    from reflade.engine.stages.prompts import make_prompts
    from reflade.engine.synth import scene_to_png_bytes
    from reflade.engine.types import Entity

    png = scene_to_png_bytes(scene)
    sha = hashlib.sha256(png).hexdigest()
    h, w = scene.image.shape[:2]
    rows = []
    for obj in scene.objects:
        cy, cx = np.argwhere(obj.visible_mask).mean(axis=0)
        horiz = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "center"
        ent = Entity(
            obj.entity_id,
            obj.box,
            obj.visible_mask,
            obj.category,
            1.0,
            "synthetic",
            {
                "color": obj.color_name,
                "position": horiz,
                "size": "small"
                if obj.amodal_mask.mean() < 0.05
                else "large"
                if obj.amodal_mask.mean() > 0.2
                else "medium",
            },
        )
        for kind in ("foreground", "background"):
            rng = np.random.default_rng(int(sha[:12], 16) + 7919 * obj.entity_id + (kind == "background"))
            if kind == "foreground":
                layer, visible = obj.layer, obj.visible_mask
            else:
                bg = scene.without(obj.entity_id)
                layer = np.dstack([bg, np.full((h, w), 255, np.uint8)])
                visible = ~obj.visible_mask
            rows.append(
                {
                    "schema_version": SCHEMA_VERSION,
                    "sample_id": make_sample_id(sha, obj.entity_id, kind, config_hash),
                    "source_id": sha[:16],
                    "source_sha256": sha,
                    "image": png,
                    "width": w,
                    "height": h,
                    "layer": encode_png(layer),
                    "visible_mask": encode_png(visible),
                    "kind": kind,
                    "category": obj.category,
                    "prompts": make_prompts(ent, obj.visible_mask, (h, w), rng, cfg, kind=kind),
                    "split": split,
                    "scores": {"occluded_fraction": float(obj.occluded_fraction)},
                    "provenance": {
                        "engine_version": ENGINE_VERSION,
                        "config_hash": config_hash,
                        "backends": {"synthetic": f"exact:{scene_id}"},
                        "weights": [],
                    },
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class StageRow:
    stage: str
    unit: str
    n_in: int
    n_out: int
    seconds: float

    @property
    def kept(self) -> float:
        return self.n_out / self.n_in if self.n_in else 0.0


@dataclass
class RunResult:
    dataset: str | None
    run_id: str
    images_in: int
    images_kept: int
    images_quarantined: int
    layers_out: int
    layers_kept: int
    layers_rejected: int
    synthetic_rows: int
    skipped_done: int
    uploaded: int
    wall_s: float
    stages: list[StageRow]
    reused: bool = False
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["stages"] = [dict(s.__dict__, kept=s.kept) for s in self.stages]
        return d


def run_engine(
    cfg,
    source: str,
    dataset: str,
    *,
    backends: str = "classical",
    limit: int | None = None,
    synthetic: int = 0,
    synthetic_size: int = 256,
    synthetic_split: str | None = None,
    progress: bool | None = None,
    log=print,
) -> RunResult:
    """Run the engine over SOURCE and register ``dataset/<dataset>`` (see the module docstring).

    Args:
        cfg: the platform ``Config`` (its ``engine`` section, storage and registry).
        source: local folder, ``s3://`` prefix, manifest file or registry reference.
        backends: ``classical`` or ``neural``.
        limit: at most this many inputs.
        synthetic: also add this many synthetic scenes as exact ground-truth rows (split ``synthetic_split``).
        synthetic_split: overrides the configuration's ``synthetic_split`` (``hash``: whole scenes to train or
            test by id).

    Raises:
        EngineError: the counts do not balance; IngestError: the input cannot be read.
    """
    import ray

    from reflade.engine.backends import FAMILIES, weights_refs
    from reflade.engine.ingest import ingest
    from reflade.engine.stages.prefilter import find_near_duplicates
    from reflade.platform.cluster import connect
    from reflade.platform.registry import Registry, validate_name
    from reflade.platform.storage import Storage

    validate_name(dataset)
    if synthetic_split is not None:
        cfg = copy.deepcopy(cfg)
        base = cfg.section("engine") if "engine" in cfg.sections else EngineConfig()
        cfg.sections["engine"] = dataclasses.replace(base, synthetic_split=synthetic_split)
    if backends not in FAMILIES:
        raise EngineError(f"unknown backends {backends!r} (known: {', '.join(FAMILIES)})")
    ecfg: EngineConfig = cfg.section("engine") if "engine" in cfg.sections else EngineConfig()
    if ecfg.synthetic_split not in ("train", "test", "quality", "hash"):
        raise EngineError(
            f"synthetic_split must be train, test, quality or hash, not {ecfg.synthetic_split!r}"
        )
    if not 0.0 <= ecfg.synthetic_test_fraction <= 1.0:
        raise EngineError(f"synthetic_test_fraction must be in [0, 1], not {ecfg.synthetic_test_fraction}")
    resolve_layout(ecfg, backends)  # a bad layout or pool size fails before anything is uploaded
    t_start = time.monotonic()
    storage = Storage.from_config(cfg)
    registry = Registry(storage, cfg.registry.prefix)

    inp = ingest(source, storage, registry, limit=limit, progress=progress)
    log(
        f"input: {len(inp.items)} files from {inp.description} ({inp.uploaded} uploaded, "
        f"{inp.already_there} already in the bucket)"
        + (f"; {len(inp.rejected)} manifest records quarantined" if inp.rejected else "")
    )
    weights = weights_refs(backends, ecfg)
    weights = [registry.resolve(w).ref for w in weights]
    config_hash = ecfg.fingerprint()
    run_id = hashlib.sha256(
        json.dumps(
            [dataset, inp.content_hash(), config_hash, backends, weights, synthetic, synthetic_size]
        ).encode()
    ).hexdigest()[:16]
    run_prefix = f"runs/engine/{dataset}/{run_id}/"
    log(f"run {run_id} under s3://{storage.bucket}/{run_prefix}")

    # Exact duplicates (same bytes) are one source: the later copies are quarantined at once.
    first: dict[str, Any] = {}
    items, exact_dups = [], []
    for it in inp.items:
        if it.source_id in first:
            exact_dups.append((it, first[it.source_id]))
        else:
            first[it.source_id] = it
            items.append(it)

    done = _done_markers(storage, run_prefix)
    done_ids = {sid for m in done.values() for sid in m["source_ids"]}
    todo = [it for it in items if it.source_id not in done_ids]
    skipped = len(items) - len(todo)
    if skipped:
        log(f"resuming: {skipped} images already staged by an earlier attempt, {len(todo)} to go")

    connect(cfg)
    backend_names = {"scene": backends, "completion": backends, "matting": "classical"}
    if backends == "neural" and (ecfg.captioner_weights or "").strip():
        backend_names["captioner"] = "neural"  # its exact weights version is in provenance.weights
    fields = _storage_fields(cfg)
    if todo:
        _run_stages(
            ray,
            todo,
            ecfg,
            backends,
            fields,
            run_prefix,
            config_hash,
            backend_names,
            weights,
            find_near_duplicates,
            done_ids,
            storage,
            progress,
            log,
            cfg.registry.prefix,
        )
    if synthetic:
        _write_synthetic(storage, run_prefix, synthetic, synthetic_size, config_hash, ecfg, log)

    return _commit(
        storage,
        registry,
        run_prefix,
        run_id,
        dataset,
        inp,
        exact_dups,
        config_hash,
        backends,
        weights,
        ecfg,
        synthetic,
        skipped,
        t_start,
        log,
    )


def _done_markers(storage, run_prefix: str) -> dict[str, dict[str, Any]]:
    out = {}
    for obj in storage.list(f"{run_prefix}done/"):
        doc, _ = storage.get_json(obj["Key"])
        out[doc["shard"]] = doc
    return out


def _run_stages(
    ray,
    todo,
    ecfg: EngineConfig,
    family,
    fields,
    run_prefix,
    config_hash,
    backend_names,
    weights,
    find_near_duplicates,
    done_ids,
    storage,
    progress,
    log,
    registry_prefix,
) -> None:

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(progress) if progress is not None else ctx.enable_progress_bars
    items = [
        {
            "source_id": it.source_id,
            "sha256": it.sha256,
            "key": it.key,
            "name": it.name,
            "ok": True,
            "stage": "",
            "reason": "",
        }
        for it in largest_first(todo, lambda it: it.size)
    ]
    bs = ecfg.batch_size
    # Cheap stages run as tasks (callable instances); stages that hold a backend run in actor pools. On a
    # small node every pool's actors must fit beside the read tasks (design.md, Pitfalls).
    task = {"num_cpus": ecfg.num_cpus_per_task, "batch_format": "pandas", "batch_size": bs}
    ds = ray.data.from_items(items, override_num_blocks=input_blocks(len(items), bs))
    ds = ds.map_batches(ReadRaw(fields), **task)
    ds = ds.map_batches(PreFilterStage(ecfg), **task)
    # Near-duplicates need every hash: a barrier on the (small, capped) pre-filtered images.
    ds = ds.materialize()
    hashes = [h for h in ds.select_columns(["source_id", "phash", "ok"]).take_all() if h["ok"]]
    order = {it.source_id: i for i, it in enumerate(todo)}
    pairs = sorted(
        ((h["source_id"], int(h["phash"])) for h in hashes if int(h["phash"])), key=lambda p: order[p[0]]
    )
    dups = find_near_duplicates(pairs, ecfg.dup_hamming)
    ds = ds.map_batches(MarkDuplicates(dups), **task)
    layout = resolve_layout(ecfg, family)
    gpu = _uses_gpu(ecfg, family)
    if layout == "fused":
        log(
            f"stages 2-6 fused: {fused_pool_size(ecfg, gpu=gpu)} actors x {ecfg.num_cpus_per_actor:g} CPU"
            + (f" + {ecfg.num_gpus:g} GPU" if gpu else "")
        )
    else:
        pool = ecfg.gpu_actors if gpu else ecfg.cpu_actors
        log(f"stages 2-6 staged: scene and completion pools of {pool}, matting pool of {ecfg.cpu_actors}")
    ds = add_layer_stages(ds, ecfg, family, fields, registry_prefix, layout)
    ds = ds.map_batches(
        ShardWriter(fields, run_prefix, config_hash, backend_names, weights, ecfg.test_fraction), **task
    )
    written = ds.take_all()
    log(f"staged {len(written)} shards")


def largest_first(items: list, size: Callable[[Any], int]) -> list:
    """``items`` in the order the run feeds them to the stages: largest first (by ``size``, the file's bytes: a
    proxy for its pixels, and so for its stage time), ties in input order.

    Actors take blocks in order, so the last blocks decide how long one actor works on while the others have
    nothing left (the run's tail). Ending on the small images shortens that tail; a big photo that came last
    would keep one core busy for seconds alone. Only the order of work changes: near-duplicates are still
    resolved in input order (the first one is kept), sample ids do not depend on the order, and a re-run skips
    done sources by id whichever shard holds them."""
    return [it for _, it in sorted(enumerate(items), key=lambda p: (-size(p[1]), p[0]))]


LAYOUTS = ("auto", "staged", "fused")

# Input blocks of one batch each, up to this many. An actor takes a whole block per task, so the run's last block
# decides how long one actor works while the others idle: with blocks of one batch that tail is one batch. (Blocks
# were once capped at 64: a 1,028-image run then had blocks of 16 images and a 5 s tail on one of two cores.)
MAX_INPUT_BLOCKS = 4096


def input_blocks(n_items: int, batch_size: int) -> int:
    """Blocks to split ``n_items`` input rows into: one per ``batch_size`` rows, at most ``MAX_INPUT_BLOCKS``."""
    return max(1, min(n_items, MAX_INPUT_BLOCKS, -(-n_items // max(1, batch_size))))


def _uses_gpu(ecfg: EngineConfig, family: str) -> bool:
    """Whether the model stages' actors take GPUs (neural backends with ``num_gpus`` > 0)."""
    return family == "neural" and ecfg.num_gpus > 0


def _check_layout_settings(ecfg: EngineConfig) -> None:
    if ecfg.layout not in LAYOUTS:
        raise EngineError(f"engine.layout must be one of {', '.join(LAYOUTS)}, not {ecfg.layout!r}")
    if ecfg.fused_actors < 0:
        raise EngineError(f"engine.fused_actors must be 0 (one per CPU) or more, not {ecfg.fused_actors}")


def resolve_layout(ecfg: EngineConfig, family: str) -> str:
    """``staged`` or ``fused`` for this run (``auto``: fused for the classical backends, staged for neural ones,
    whose models would be loaded once per actor, that is once per CPU, in the fused layout)."""
    _check_layout_settings(ecfg)
    if ecfg.layout != "auto":
        return ecfg.layout
    return "staged" if family == "neural" else "fused"


def fused_pool_size(ecfg: EngineConfig, cluster_cpus: float | None = None, gpu: bool = False) -> int:
    """Actors of the fused layout: ``fused_actors``; else ``gpu_actors`` when the actors take GPUs; else one per
    CPU of the cluster (at least one)."""
    _check_layout_settings(ecfg)
    if ecfg.fused_actors:
        return ecfg.fused_actors
    if gpu:
        return ecfg.gpu_actors
    if cluster_cpus is None:
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cluster_cpus))


class LayerStages:
    """Stages 2-6 in one process (the fused layout's actor, and ``run_stages_plain``): the same stage objects
    as the staged layout, called in sequence on each batch, so that a batch never leaves the process between
    stages: no scheduling, no Arrow round trips, and each image's ``Work`` goes from stage to stage as the
    object itself (pickled once, by the last stage, instead of at every hand-off)."""

    def __init__(
        self,
        family: str,
        cfg: EngineConfig,
        storage_fields: dict[str, Any] | None = None,
        registry_prefix: str | None = None,
    ):
        args = (family, cfg, storage_fields, registry_prefix)
        self.stages = [
            SceneStage(*args),
            CompletionStage(*args),
            MattingStage(*args),
            PromptStage(cfg),
            PostFilterStage(cfg),
        ]
        for stage in self.stages[:-1]:
            stage.pickle_out = False

    def __call__(self, batch):
        for stage in self.stages:
            batch = stage(batch)
        # Images that left the run before the last stage (no entity found, say) still hold the object.
        if "work" in batch and any(isinstance(w, Work) for w in batch["work"]):
            batch["work"] = [pickle.dumps(w) if isinstance(w, Work) else w for w in batch["work"]]
        return batch


def add_layer_stages(
    ds,
    ecfg: EngineConfig,
    family: str,
    storage_fields: dict[str, Any] | None = None,
    registry_prefix: str | None = None,
    layout: str | None = None,
    fused_class: type | None = None,
):
    """Append stages 2-6 (scene, completion, matting, prompts, post-filter) to a Ray dataset of pre-filtered
    image records, in the layout ``layout`` (default: ``resolve_layout``). Staged: model stages in actor pools
    (GPU pools for neural backends when ``num_gpus`` > 0), prompts and post-filter as tasks. Fused: one actor
    pool (``fused_pool_size``) running all five stages on each batch, as ``fused_class`` (default
    ``LayerStages``; a subclass with the same constructor, for instance one that times its calls)."""
    from ray.data import ActorPoolStrategy

    bs = ecfg.batch_size
    layout = layout or resolve_layout(ecfg, family)
    args = (family, ecfg, storage_fields, registry_prefix)
    gpu = _uses_gpu(ecfg, family)
    if layout == "fused":
        return ds.map_batches(
            fused_class or LayerStages,
            fn_constructor_args=args,
            compute=ActorPoolStrategy(size=fused_pool_size(ecfg, gpu=gpu)),
            num_cpus=ecfg.num_cpus_per_actor,
            num_gpus=ecfg.num_gpus if gpu else 0,
            batch_format="pandas",
            batch_size=bs,
        )
    if layout != "staged":
        raise EngineError(f"unknown layout {layout!r} (staged or fused)")
    task = {"num_cpus": ecfg.num_cpus_per_task, "batch_format": "pandas", "batch_size": bs}
    model = {
        "num_cpus": ecfg.num_cpus_per_actor,
        "num_gpus": ecfg.num_gpus if gpu else 0,
        "batch_format": "pandas",
        "batch_size": bs,
    }
    cpu_actor = {"num_cpus": ecfg.num_cpus_per_actor, "batch_format": "pandas", "batch_size": bs}
    pool = ecfg.gpu_actors if gpu else ecfg.cpu_actors
    ds = ds.map_batches(SceneStage, fn_constructor_args=args, compute=ActorPoolStrategy(size=pool), **model)
    ds = ds.map_batches(
        CompletionStage, fn_constructor_args=args, compute=ActorPoolStrategy(size=pool), **model
    )
    # Matting is CPU work: its own pool, so that it overlaps the GPU stages.
    ds = ds.map_batches(
        MattingStage, fn_constructor_args=args, compute=ActorPoolStrategy(size=ecfg.cpu_actors), **cpu_actor
    )
    ds = ds.map_batches(PromptStage(ecfg), **task)
    return ds.map_batches(PostFilterStage(ecfg), **task)


def run_stages_plain(
    records: list[dict[str, Any]],
    ecfg: EngineConfig,
    family: str = "classical",
    batch_size: int | None = None,
    storage_fields: dict[str, Any] | None = None,
    registry_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """The same stage code in one process, no Ray: records with ``source_id``, ``sha256``, ``name`` and the raw
    ``data`` bytes in, per-image records (with the pickled ``work``) out. The baseline of ``bench/engine.py``."""
    from reflade.engine.stages.prefilter import find_near_duplicates

    bs = batch_size or ecfg.batch_size
    rows = [dict(r, ok=True, stage="", reason="") for r in records]
    pre = PreFilterStage(ecfg)
    frames = [pre(_frame(rows[i : i + bs])) for i in range(0, len(rows), bs)]
    done = [r for f in frames for r in _rows(f)]
    pairs = [(r["source_id"], int(r["phash"])) for r in done if r["ok"] and int(r["phash"])]
    mark = MarkDuplicates(find_near_duplicates(pairs, ecfg.dup_hamming))
    layers = LayerStages(family, ecfg, storage_fields, registry_prefix)
    out = []
    for i in range(0, len(done), bs):
        out += _rows(layers(mark(_frame(done[i : i + bs]))))
    return out


def _write_synthetic(storage, run_prefix, n, size, config_hash, ecfg, log) -> None:
    """Synthetic scenes become exact ground-truth rows, staged like any other shard (resumable too)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reflade.engine.synth import make_scene

    done = _done_markers(storage, run_prefix)
    done_ids = {sid for m in done.values() for sid in m["source_ids"]}
    per_shard = 16
    made = 0
    for start in range(0, n, per_shard):
        # Texture backgrounds: the bundled photos are real-photo inputs, and test rows must not share them.
        scenes = [
            (i, make_scene(seed=100_000 + i, size=(size, size), background="texture"))
            for i in range(start, min(n, start + per_shard))
        ]
        ids = [f"synthetic-{i:06d}" for i, _ in scenes]
        if all(i in done_ids for i in ids):
            continue
        rows = []
        for (_, scene), sid in zip(scenes, ids, strict=True):
            split = ecfg.synthetic_split
            if (
                split == "hash"
            ):  # whole scenes per split, by id: the same scene lands in the same split every run
                split = split_for(hashlib.sha256(sid.encode()).hexdigest(), ecfg.synthetic_test_fraction)
            for row in synthetic_rows(scene, sid, config_hash, split, ecfg):
                row["source_id"] = sid
                rows.append(row)
        name = shard_name(ids)
        fs = storage.fs
        pq.write_table(
            rows_to_table(rows),
            storage.path(f"{run_prefix}staged/{name}.parquet"),
            filesystem=fs,
            compression="zstd",
        )
        pq.write_table(
            pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA),
            storage.path(f"{run_prefix}quarantine/{name}.parquet"),
            filesystem=fs,
        )
        storage.put_json(
            f"{run_prefix}done/{name}.json",
            {
                "shard": name,
                "images": len(ids),
                "images_kept": len(ids),
                "layers_kept": len(rows),
                "layers_rejected": 0,
                "source_ids": ids,
                "counts": {},
                "timings": {},
                "synthetic": True,
            },
        )
        made += len(rows)
    log(f"synthetic: {n} scenes staged ({made} new rows)")


def _commit(
    storage,
    registry,
    run_prefix,
    run_id,
    dataset,
    inp,
    exact_dups,
    config_hash,
    family,
    weights,
    ecfg,
    synthetic,
    skipped,
    t_start,
    log,
) -> RunResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = _done_markers(storage, run_prefix)
    fs = storage.fs
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    timings: dict[str, float] = defaultdict(float)

    with tempfile.TemporaryDirectory(prefix="reflade-commit-") as tmp:
        out = Path(tmp) / "dataset"
        (out / "shards").mkdir(parents=True)
        manifest_path = Path(tmp) / "manifest.json"
        manifest_path.write_text(json.dumps(inp.manifest(), indent=1, sort_keys=True))
        # A source staged by two shards (a worker of a killed attempt finishing its batch after the restart
        # listed the markers) is taken from the first shard only: the stages are deterministic per image.
        covered: set[str] = set()
        seen_samples: set[str] = set()
        layer_sources: set[str] = set()
        layers_kept = 0
        synthetic_rows_n = 0
        q_tables = []
        repeated = 0
        layers_out = 0
        for name in sorted(done):
            marker = done[name]
            new = set(marker["source_ids"]) - covered
            repeated += len(marker["source_ids"]) - len(new)
            covered |= new
            if not new:
                continue
            if len(new) == len(marker["source_ids"]):
                for stage, (a, b) in marker["counts"].items():
                    counts[stage][0] += a
                    counts[stage][1] += b
                for stage, secs in marker["timings"].items():
                    timings[stage] += secs
            table = pq.read_table(storage.path(f"{run_prefix}staged/{name}.parquet"), filesystem=fs)
            qt = pq.read_table(storage.path(f"{run_prefix}quarantine/{name}.parquet"), filesystem=fs)
            if len(new) < len(marker["source_ids"]):
                keep = pa.array(sorted(new))
                table = table.filter(pa.compute.is_in(table.column("source_id"), value_set=keep))
                qt = qt.filter(pa.compute.is_in(qt.column("source_id"), value_set=keep))
            if len(new) == len(marker["source_ids"]):
                # What the stages reported: checked against what the shards hold below.
                layers_out += marker.get("layers_kept", 0) + marker.get("layers_rejected", 0)
            else:
                layers_out += table.num_rows + sum(e is not None for e in qt.column("entity_id").to_pylist())
            ids = table.column("sample_id").to_pylist()
            if seen_samples.intersection(ids) or len(set(ids)) != len(ids):
                raise EngineError(
                    f"shard {name} repeats samples of another source: the staged data is corrupt"
                )
            seen_samples.update(ids)
            layer_sources.update(table.column("source_id").to_pylist())
            layers_kept += table.num_rows
            if marker.get("synthetic"):
                synthetic_rows_n += table.num_rows
            if table.num_rows:
                pq.write_table(table, out / "shards" / f"{name}.parquet", compression="zstd")
            q_tables.append(qt)
        if repeated:
            log(
                f"{repeated} images were staged twice (a killed attempt's worker finished late); kept one copy each"
            )
        extra = [
            {
                "source_id": it.source_id,
                "source_sha256": it.sha256,
                "name": it.name,
                "stage": "ingest",
                "reason_code": "duplicate_of",
                "reason": f"duplicate_of: same bytes as {orig.name}",
                "entity_id": None,
                "kind": None,
                "sample_id": None,
            }
            for it, orig in exact_dups
        ]
        extra += [r.quarantine_row() for r in inp.rejected]  # malformed manifest records, never read
        q = pa.concat_tables([*q_tables, pa.Table.from_pylist(extra, schema=QUARANTINE_SCHEMA)])
        q_rows = q.to_pylist()
        image_q = [r for r in q_rows if r["entity_id"] is None]
        layer_q = [r for r in q_rows if r["entity_id"] is not None]

        images_in = len(inp.items) + len(inp.rejected) + synthetic
        images_q = len(image_q)
        images_kept = len(layer_sources)
        if images_kept + images_q != images_in:
            raise EngineError(
                f"counts do not balance: images in {images_in} != kept {images_kept} + quarantined {images_q}"
            )
        if layers_kept + len(layer_q) != layers_out:
            raise EngineError(
                f"counts do not balance: layers out {layers_out} != kept {layers_kept} + rejected {len(layer_q)}"
            )
        pq.write_table(q, out / "quarantine.parquet")
        reasons: dict[str, int] = defaultdict(int)
        for r in q_rows:
            reasons[f"{r['stage']}:{r['reason_code']}"] += 1
        stage_rows = []
        for stage in STAGES:
            if stage in counts:
                unit = "images" if stage in IMAGE_STAGES else "layers"
                stage_rows.append(
                    StageRow(stage, unit, counts[stage][0], counts[stage][1], timings.get(stage, 0.0))
                )
        result = RunResult(
            dataset=None,
            run_id=run_id,
            images_in=images_in,
            images_kept=images_kept,
            images_quarantined=images_q,
            layers_out=layers_out,
            layers_kept=layers_kept,
            layers_rejected=len(layer_q),
            synthetic_rows=synthetic_rows_n,
            skipped_done=skipped,
            uploaded=inp.uploaded,
            wall_s=0.0,
            stages=stage_rows,
            quarantine_reasons=dict(reasons),
        )
        # Only what the committed data says: a re-run of a finished run then reproduces the same bytes and the
        # registry returns the existing version.
        stats = {
            k: v
            for k, v in result.as_dict().items()
            if k not in ("dataset", "wall_s", "skipped_done", "uploaded", "reused")
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        input_ref = registry.create(
            "raw-manifest",
            f"{dataset}-input",
            files={"manifest.json": manifest_path},
            parents=inp.parents,
            metadata={"description": inp.description, "count": len(inp.items)},
        )
        if layers_kept == 0:
            raise EngineError(
                "no layer survived the engine: nothing to register (see the quarantine reasons)"
            )
        version = registry.create(
            "dataset",
            dataset,
            out,
            parents=[input_ref.ref, *weights],
            metadata={
                "schema_version": SCHEMA_VERSION,
                "engine_version": ENGINE_VERSION,
                "config_hash": config_hash,
                "backends": family,
                "run_id": run_id,
                "engine_config": ecfg.__dict__,
                "rows": layers_kept,
            },
            metrics={
                "images_in": images_in,
                "images_kept": images_kept,
                "layers_kept": layers_kept,
                "layers_rejected": len(layer_q),
                "prefilter_pass": counts["prefilter"][1] / counts["prefilter"][0]
                if counts["prefilter"][0]
                else 0,
                "end_to_end": layers_kept / layers_out if layers_out else 0,
            },
        )
    result.dataset = version.ref
    result.reused = version.reused
    result.wall_s = time.monotonic() - t_start
    log(
        f"{'reused' if version.reused else 'registered'} {version.ref}: {layers_kept} layers "
        f"({synthetic_rows_n} synthetic), {images_q} images quarantined"
    )
    return result


def stage_table(result: RunResult):
    """A rich table: per stage in, out, kept %, seconds, units/s, and the paper's figures beside ours."""
    from rich.table import Table

    table = Table(
        "stage", "unit", "in", "out", "kept %", "seconds", "per s", "paper", title="data engine stages"
    )
    for s in result.stages:
        paper = f"{PAPER_PREFILTER_PASS:.1%} pass" if s.stage == "prefilter" else ""
        rate = f"{s.n_in / s.seconds:.1f}" if s.seconds else "-"
        table.add_row(
            s.stage, s.unit, str(s.n_in), str(s.n_out), f"{100 * s.kept:.1f}", f"{s.seconds:.1f}", rate, paper
        )
    # End to end over the layers the engine made (synthetic rows are exact and skip the stages).
    made = result.layers_out - result.synthetic_rows
    kept = result.layers_kept - result.synthetic_rows
    end = kept / made if made else 0.0
    table.add_row(
        "[bold]end to end",
        "layers",
        str(made),
        str(kept),
        f"{100 * end:.1f}",
        f"{result.wall_s:.1f}",
        "",
        f"~{PAPER_END_TO_END:.0%} survive",
    )
    return table


__all__ = ["EngineError", "RunResult", "run_engine", "stage_table", "synthetic_rows"]
