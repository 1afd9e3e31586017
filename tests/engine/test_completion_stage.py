"""The completion stage hands a backend with ``complete_batch`` every image of a batch at once, and falls back to
one image at a time when that call fails, so that only the bad image is quarantined."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pandas as pd

from reflade.engine.pipeline import CompletionStage, Work
from reflade.engine.types import Completion


class _Recorder:
    """A completion backend that records its calls and completes each entity with the image as background."""

    def __init__(self, fail_on: int | None = None):
        self.batch_calls: list[int] = []
        self.single_calls = 0
        self.fail_on = fail_on  # an image whose completion raises (by its top-left pixel value)

    def _one(self, image, entities):
        if self.fail_on is not None and int(image[0, 0, 0]) == self.fail_on:
            raise ValueError("bad image")
        out = []
        for _ in entities:
            rgba = np.zeros((*image.shape[:2], 4), np.uint8)
            out.append(Completion(rgba=rgba, amodal_mask=np.zeros(image.shape[:2], bool), background=image))
        return out

    def complete(self, image, entities):
        self.single_calls += 1
        return self._one(image, entities)

    def complete_batch(self, images, entities_list):
        self.batch_calls.append(len(images))
        return [self._one(i, e) for i, e in zip(images, entities_list, strict=True)]


def _stage(backend) -> CompletionStage:
    stage = CompletionStage.__new__(CompletionStage)  # no registry or weights: the backend is given
    stage.family, stage.cfg, stage.registry, stage.backend = "neural", None, None, backend
    # One call at a time (the batcher of calls in flight: tests/engine/test_completion_batcher.py).
    stage.batcher, stage.one_at_a_time = None, threading.Lock()
    return stage


def _batch(n: int, ok=None) -> pd.DataFrame:
    rows = []
    for i in range(n):
        work = Work(image=np.full((8, 10, 3), i, np.uint8), entities=[object()] * (i + 1))
        good = True if ok is None else ok[i]
        rows.append({"source_id": f"s{i}", "ok": good, "stage": "", "reason": "", "work": pickle.dumps(work)})
    return pd.DataFrame(rows)


def test_one_backend_call_for_the_whole_batch():
    backend = _Recorder()
    out = _stage(backend)(_batch(3, ok=[True, False, True]))
    assert backend.batch_calls == [2] and backend.single_calls == 0  # the rejected row is not completed
    works = [pickle.loads(w) for w in out["work"]]
    assert [len(w.completions) for w in works] == [1, 0, 3]
    assert works[0].counts["completion"] == [2, 2] and works[2].counts["completion"] == [6, 6]
    assert "completion" in works[0].timings and "completion" not in works[1].timings


def test_a_failing_batch_is_retried_image_by_image():
    backend = _Recorder(fail_on=1)
    out = _stage(backend)(_batch(3))
    assert backend.batch_calls == [3] and backend.single_calls == 3
    assert list(out["ok"]) == [True, False, True]
    assert out["stage"][1] == "completion" and "bad image" in out["reason"][1]
    works = [pickle.loads(w) for w in out["work"]]
    assert [len(w.completions) for w in works] == [1, 0, 3]


def test_backends_without_complete_batch_run_per_image():
    class PerImage(_Recorder):
        complete_batch = None

    backend = PerImage()
    _stage(backend)(_batch(2))
    assert backend.single_calls == 2
