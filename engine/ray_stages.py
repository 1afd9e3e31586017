"""The data engine's stages as record stages (:class:`~reflade.engine.record_stage.RecordStage`): read, pre-filter,
near-duplicates, scene, completion, matting, prompts, post-filter. Each says what it does to one image record; the
loop, timing, quarantine and hand-off are the adapter's. The stage logic itself lives in ``engine/stages/`` and
``engine/backends/``."""

from __future__ import annotations

import abc
import threading
from typing import Any

import numpy as np

from reflade.engine.config import EngineConfig
from reflade.engine.record_stage import (
    LayerOut,
    RecordStage,
    Work,
    count,
    error_reason,
    load_work,
    quarantine,
    to_batch,
    to_records,
)
from reflade.engine.schema import decode_image
from reflade.platform.worker import worker_registry, worker_storage


class ReadRaw:
    """Fetch each input's bytes from the bucket (credentials from the worker's own environment)."""

    def __init__(self, storage_fields: dict[str, Any]):
        self.fields = storage_fields

    @property
    def storage(self):
        return worker_storage(self.fields)

    def __call__(self, batch):
        rows = to_records(batch)
        for r in rows:
            try:
                r["data"], _ = self.storage.get_bytes(r["key"])
            except Exception as e:  # a missing raw object is quarantined, not fatal
                r["data"] = b""
                quarantine(r, "read", f"unreadable: {type(e).__name__}: {e}")
        return to_batch(rows)


class PreFilterStage(RecordStage):
    """Stage 1: decode safely and reject unsuitable images, with a reason. Every record gets its ``Work`` here
    (an unreadable one too, so that it is counted)."""

    stage = "prefilter"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def accepts(self, r):
        return True

    def open(self, r):
        return Work()

    def process(self, r, work):
        if not r["ok"]:
            return
        from reflade.engine.stages.prefilter import decode_and_check

        d = decode_and_check(r["data"], self.cfg, r["name"])
        work.scores.update(d.scores)
        r["phash"] = str(d.phash or 0)
        if d.ok:
            work.image_png = d.image_png
        else:
            quarantine(r, "prefilter", d.reason or "rejected")

    def close(self, r, work):
        count(work, "prefilter", 1, int(r["ok"]))
        r["phash"] = str(r.get("phash") or "0")
        r["data"] = b""  # the stored PNG is in the Work now


class MarkDuplicates(RecordStage):
    """Stage 1b: near-duplicates (perceptual hash) found over the whole input are quarantined."""

    stage = "dedup"
    timed = False

    def __init__(self, duplicates: dict[str, str]):
        self.duplicates = duplicates

    def process(self, r, work):
        kept = self.duplicates.get(r["source_id"])
        if kept:
            quarantine(r, "dedup", f"duplicate_of: near-duplicate of {kept}")

    def close(self, r, work):
        count(work, "dedup", 1, int(r["ok"]))


class ModelStage(RecordStage):
    """A stage that holds a backend (an actor in a Ray Data actor pool). Backends that load weights read them
    from the driver's registry (``storage_fields`` and ``registry_prefix``, no credentials)."""

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

    def batched(self, batch, run, apply):
        """Run the whole batch through one backend call, ``run(works) -> results``, then ``apply(r, work, result)``
        per image; with fewer than two live images, or when that call fails, each image runs alone (the record
        loop: so only a bad one is quarantined, with its error)."""
        import time

        rows = to_records(batch)
        live = [(r, load_work(r["work"])) for r in rows if r["ok"]]
        if len(live) < 2:
            return RecordStage.__call__(self, batch)
        t0 = time.perf_counter()
        try:
            results = run([w for _, w in live])
        except Exception:  # noqa: BLE001 - retried image by image, where the error is recorded
            return RecordStage.__call__(self, batch)
        share = (time.perf_counter() - t0) / len(live)  # the batch's time, split evenly between its images
        for (r, work), result in zip(live, results, strict=True):
            apply(r, work, result)
            work.timings[self.stage] = work.timings.get(self.stage, 0.0) + share
            r["work"] = self.hand_on(work)
        return to_batch(rows)


class SceneStage(ModelStage):
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
        count(work, "scene", 1, int(bool(work.entities)))
        if not work.entities:
            quarantine(r, "scene", "no_entities: no candidate entity found")

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

        return self.batched(batch, run, apply)


class CompletionStage(ModelStage):
    """Stage 3: amodal completion of each entity and the background with it removed.

    Args:
        calls_in_flight: how many calls (Ray Data batches) this actor runs at once (the staged layout passes
            ``engine.completion_calls_in_flight``). Above 1, with a backend that exposes its hole steps (neural),
            the calls share one :class:`~reflade.engine.completion_batcher.HoleBatcher`: holes of several batches
            go through the sampler together (engine/completion_batcher.py).
    """

    stage = "completion"

    def __init__(
        self,
        family: str,
        cfg: EngineConfig,
        storage_fields: dict[str, Any] | None = None,
        registry_prefix: str | None = None,
        calls_in_flight: int = 1,
    ):
        super().__init__(family, cfg, storage_fields, registry_prefix)
        self.batcher = None
        # Calls that cannot share a batcher run one at a time: a backend holds state (the sampler's scheduler).
        self.one_at_a_time = threading.Lock()
        if calls_in_flight > 1 and hasattr(self.backend, "holes"):
            from reflade.engine.completion_batcher import HoleBatcher

            self.batcher = HoleBatcher(self.backend, cfg.completion_batch_wait_s)

    def make_backend(self):
        from reflade.engine.backends import make_completion_backend

        return make_completion_backend(self.family, self.cfg, self.registry)

    def process(self, r, work):
        if self.batcher is not None:
            work.completions = self.batcher.complete_batch([work.image], [work.entities])[0]
        else:
            work.completions = self.backend.complete(work.image, work.entities)
        count(work, "completion", 2 * len(work.entities), 2 * len(work.completions))

    def __call__(self, batch):
        """Backends with ``complete_batch`` (neural) get every image of the batch at once, so that holes of the
        same sampling side share sampler batches across images (and, through the batcher, across the calls in
        flight); if that call fails, each image runs alone so that only a bad one is quarantined. With calls in
        flight, a call's seconds include the time its holes wait for shared sampler batches."""
        if self.batcher is None:
            with self.one_at_a_time:
                return self._complete(batch, getattr(self.backend, "complete_batch", None))
        return self._complete(batch, self.batcher.complete_batch)

    def _complete(self, batch, complete_batch):
        if complete_batch is None:
            return super().__call__(batch)

        def apply(r, work, completions):
            work.completions = completions
            count(work, "completion", 2 * len(work.entities), 2 * len(completions))

        return self.batched(
            batch, lambda works: complete_batch([w.image for w in works], [w.entities for w in works]), apply
        )


class MattingStage(ModelStage):
    """Stage 4: mask refinement, alpha matting and foreground colours at soft edges."""

    stage = "matting"

    def make_backend(self):
        from reflade.engine.backends import make_matting_backend

        return make_matting_backend(self.family, self.cfg, self.registry)

    def process(self, r, work):
        # In sequence here (the fused layout, the plain loop); the staged layout mattes each entity in its own
        # call (engine/layer_units.py).
        layers = []
        for ent, comp in zip(work.entities, work.completions, strict=True):
            layers += self.matte(work.image, ent, comp)
        work.layers = layers
        count(work, "matting", len(layers), sum(lay.ok for lay in layers))
        work.completions = []  # no longer needed: keep the pickles small

    def matte(self, image: np.ndarray, ent, comp) -> list[LayerOut]:
        """The two layers of one entity: its foreground (the completion refined by the matting backend; rejected
        with the error if refining fails) and the background with it removed.

        Args:
            image: HxWx3 uint8 RGB.
            ent: the stage-2 entity (``mask`` HxW bool).
            comp: its stage-3 :class:`~reflade.engine.types.Completion`.
        """
        fg = LayerOut(ent.entity_id, "foreground", ent.label, visible_mask=ent.mask)
        try:
            fg.rgba = self.backend.refine(image, comp, ent.mask)
            fg.scores.update(comp.scores)
        except Exception as e:
            fg.reject("matting", error_reason(e))
        bg_rgba = np.dstack([comp.background, np.full(comp.background.shape[:2], 255, np.uint8)])
        bg = LayerOut(ent.entity_id, "background", ent.label, rgba=bg_rgba, visible_mask=~ent.mask)
        return [fg, bg]


class PromptStage(RecordStage):
    """Stage 5: spatial, textual and mixed prompts at two granularities for every layer."""

    stage = "prompts"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def process(self, r, work):
        from reflade.engine.stages.prompts import caption_text, make_prompts

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
                lay.prompts = make_prompts(ent, ent.mask, work.image.shape[:2], rng, self.cfg, kind=lay.kind)
                if ent.caption is not None:  # 1: the fine text is the captioner's; 0: the template's
                    lay.scores["caption_used"] = float(caption_text(ent, lay.kind) is not None)
                if not lay.prompts:
                    lay.reject("prompts", "no_prompts: none could be made")
            except Exception as e:
                lay.reject("prompts", error_reason(e))
        count(work, "prompts", n_in, sum(lay.ok for lay in work.layers))


class PostFilterStage(RecordStage):
    """Stage 6: reject layers that fail fidelity checks; an image with no layer left is quarantined."""

    stage = "postfilter"

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg

    def process(self, r, work):
        from reflade.engine.stages.postfilter import check_layer

        n_in = sum(lay.ok for lay in work.layers)
        for lay in work.layers:
            if not lay.ok:
                continue
            try:
                v = check_layer(lay.rgba, work.image, lay.visible_mask, lay.kind, self.cfg)
                lay.scores.update(v.scores)
                if not v.ok:
                    lay.reject("postfilter", v.reason or "rejected")
            except Exception as e:
                lay.reject("postfilter", error_reason(e))
        kept = sum(lay.ok for lay in work.layers)
        count(work, "postfilter", n_in, kept)
        if kept == 0:
            quarantine(r, "postfilter", "all_layers_rejected: no layer passed the checks")
