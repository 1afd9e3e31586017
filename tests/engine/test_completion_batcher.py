"""Holes of several calls sampled together inside one completion actor (engine/completion_batcher.py): the
completions equal the one-batch-at-a-time path (each hole has its own seed), holes of two input batches share a
sampler call (counted from outside, by wrapping the backend's ``sample``), and an error reaches the calls whose
holes it hit. Tiny neural weights, on the CPU; one test through Ray Data's concurrent actor calls."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import threading
import uuid

import numpy as np
import pandas as pd
import pytest

from reflade.engine.backends import make_scene_backend
from reflade.engine.backends.neural_completion import NeuralCompletionBackend
from reflade.engine.backends.tiny_weights import register_tiny_weights
from reflade.engine.completion_batcher import HoleBatcher
from reflade.engine.config import EngineConfig
from reflade.engine.layout import completion_map_args
from reflade.engine.ray_stages import CompletionStage
from reflade.engine.record_stage import Work, load_work
from reflade.engine.synth import make_scene
from reflade.platform.registry import Registry

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(600)]

BLOCKS = [[801, 802], [803, 804]]
"""Two input batches of two synthetic scenes each (by seed)."""
TOLERANCE = 2
"""Most a uint8 channel may differ between sampler batch compositions (float rounding in batched kernels)."""


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tiny(storage) -> Registry:
    registry = Registry(storage, prefix=f"registry-batcher-{uuid.uuid4().hex[:10]}")
    register_tiny_weights(registry, ["tiny-repaint"])
    return registry


@pytest.fixture(scope="module")
def inputs() -> list[list[tuple[np.ndarray, list]]]:
    """Per input batch, (image, entities) pairs: synthetic scenes and the classical scene stage's entities."""
    scene = make_scene_backend("classical", EngineConfig())
    out = []
    for seeds in BLOCKS:
        pairs = []
        for s in seeds:
            image = make_scene(seed=s).image
            pairs.append((image, scene.detect(image)))
        out.append(pairs)
    return out


@pytest.fixture(scope="module")
def backend(tiny, tmp_path_factory) -> NeuralCompletionBackend:
    return NeuralCompletionBackend(EngineConfig(), registry=tiny, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def one_at_a_time(backend, inputs) -> dict[str, list]:
    """Completions of each input batch by its own complete_batch call: {image digest: completions}."""
    out = {}
    for pairs in inputs:
        comps = backend.complete_batch([p[0] for p in pairs], [p[1] for p in pairs])
        out.update({_digest(p[0]): c for p, c in zip(pairs, comps, strict=True)})
    return out


class _Recording:
    """Wraps a backend's ``sample`` (an instance attribute, from outside): per sampler call, the digests of the
    images its holes came from."""

    def __init__(self, backend):
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()
        inner = backend.sample

        def sample(images, holes, side):
            with self.lock:
                self.calls.append([_digest(i) for i in images])
            return inner(images, holes, side)

        backend.sample = sample
        self.backend = backend

    def undo(self) -> None:
        del self.backend.sample


def _assert_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.amodal_mask, w.amodal_mask)
        for a, b in ((g.rgba, w.rgba), (g.background, w.background)):
            diff = np.abs(a.astype(int) - b.astype(int))
            assert diff.max() <= TOLERANCE, diff.max()
        assert g.scores == w.scores


def _shared(calls: list[list[str]], inputs) -> int:
    """Sampler calls holding holes of images from both input batches."""
    blocks = [{_digest(p[0]) for p in pairs} for pairs in inputs]
    return sum(all(blk & set(c) for blk in blocks) for c in calls)


def test_two_calls_share_sampler_batches_and_get_the_one_batch_results(backend, inputs, one_at_a_time):
    recording = _Recording(backend)
    try:
        batcher = HoleBatcher(backend, wait_s=1.0)
        results: dict[int, list] = {}
        barrier = threading.Barrier(len(inputs))

        def call(k: int) -> None:
            pairs = inputs[k]
            barrier.wait()
            results[k] = batcher.complete_batch([p[0] for p in pairs], [p[1] for p in pairs])

        threads = [threading.Thread(target=call, args=(k,)) for k in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        recording.undo()
    assert sorted(results) == [0, 1]
    for k, pairs in enumerate(inputs):
        for p, comps in zip(pairs, results[k], strict=True):
            _assert_close(comps, one_at_a_time[_digest(p[0])])
    holes = sum(len(backend.holes(0, image, ents)) for pairs in inputs for image, ents in pairs)
    assert sum(len(c) for c in recording.calls) == holes == batcher.stats.holes  # every hole sampled once
    assert _shared(recording.calls, inputs) >= 1, recording.calls
    assert batcher.stats.shared_batches >= 1
    # Fewer sampler calls than one batch at a time would have made (one per side per input batch).
    per_batch = sum(
        len({h.side for image, ents in pairs for h in backend.holes(0, image, ents)}) for pairs in inputs
    )
    assert len(recording.calls) < per_batch


def test_a_sampler_error_reaches_the_calls_it_hit_and_the_batcher_lives_on(backend, inputs, one_at_a_time):
    batcher = HoleBatcher(backend, wait_s=0.05)

    def failing(images, holes, side):
        raise RuntimeError("the GPU fell over")

    backend.sample = failing  # an instance attribute over the method, from outside
    try:
        with pytest.raises(RuntimeError, match="the GPU fell over"):
            batcher.complete_batch([inputs[0][0][0]], [inputs[0][0][1]])
    finally:
        del backend.sample
    image, ents = inputs[0][0]
    _assert_close(batcher.complete_batch([image], [ents])[0], one_at_a_time[_digest(image)])
    assert batcher.complete_batch([image], [[]]) == [[]]  # no hole: no wait


def test_bad_settings_are_named(backend):
    with pytest.raises(ValueError, match="completion_batch_wait_s must be > 0"):
        HoleBatcher(backend, wait_s=0)
    with pytest.raises(ValueError, match="cannot batch holes across calls"):
        HoleBatcher(object(), wait_s=0.1)
    with pytest.raises(ValueError, match="2 images but 1 entity lists"):
        HoleBatcher(backend, wait_s=0.1).complete_batch([np.zeros((8, 8, 3), np.uint8)] * 2, [[]])


def test_pool_settings_of_the_staged_completion_pool():
    from reflade.engine.errors import EngineError

    args = ("neural", EngineConfig(), None, None)
    neural = completion_map_args(EngineConfig(completion_calls_in_flight=3), "neural", args)
    assert neural["fn_constructor_kwargs"] == {"calls_in_flight": 3}
    assert neural["compute"].max_concurrent_calls_per_actor == 3
    assert neural["compute"].enable_true_multi_threading
    classical = completion_map_args(EngineConfig(completion_calls_in_flight=3), "classical", args)
    assert classical["fn_constructor_kwargs"] == {
        "calls_in_flight": 1
    }  # no holes to share: one call at a time
    assert classical["compute"].max_concurrent_calls_per_actor is None
    with pytest.raises(EngineError, match="completion_calls_in_flight must be 1 or more, not 0"):
        completion_map_args(EngineConfig(completion_calls_in_flight=0), "neural", args)


class RecordingCompletionStage(CompletionStage):
    """The product's completion stage with its backend's ``sample`` wrapped (:class:`_Recording`); each output
    batch carries the sampler calls recorded since the last one in a ``sampler_calls`` column (JSON)."""

    def make_backend(self):
        backend = super().make_backend()
        self.recording = _Recording(backend)
        return backend

    def __call__(self, batch):
        out = super().__call__(batch)
        with self.recording.lock:
            calls, self.recording.calls = self.recording.calls, []
        out["sampler_calls"] = [json.dumps(calls)] + [json.dumps([])] * (len(out) - 1)
        return out


def test_through_ray_data_holes_of_two_input_batches_share_a_sampler_call(
    ray_cluster, storage_config, tiny, inputs, one_at_a_time
):
    """Two input blocks into one completion actor that runs two calls at once (the staged layout's settings):
    the completions equal one batch at a time, and some sampler call held holes of both blocks."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    cfg = EngineConfig(batch_size=2, completion_calls_in_flight=2, completion_batch_wait_s=1.0)
    frames = []
    for k, pairs in enumerate(inputs):
        rows = [
            {
                "source_id": f"b{k}-{i}",
                "ok": True,
                "stage": "",
                "reason": "",
                "work": pickle.dumps(Work(image=image, entities=ents)),
            }
            for i, (image, ents) in enumerate(pairs)
        ]
        frames.append(pd.DataFrame(rows))
    fields = {
        "endpoint": storage_config.endpoint,
        "bucket": storage_config.bucket,
        "region": storage_config.region,
    }
    args = ("neural", cfg, fields, tiny.prefix.rstrip("/"))
    kwargs = completion_map_args(cfg, "neural", args)
    assert kwargs["fn_constructor_kwargs"] == {"calls_in_flight": 2}
    out = ray.data.from_pandas(frames).map_batches(RecordingCompletionStage, **kwargs).take_all()
    assert sorted(r["source_id"] for r in out) == ["b0-0", "b0-1", "b1-0", "b1-1"] and all(
        r["ok"] for r in out
    )
    for r in out:
        work = load_work(r["work"])
        _assert_close(work.completions, one_at_a_time[_digest(work.image)])
    calls = [c for r in out for c in json.loads(r["sampler_calls"])]
    assert _shared(calls, inputs) >= 1, calls
