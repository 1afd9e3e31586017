"""The scene stage hands a backend with ``detect_batch`` every image of a batch at once (the neural backend's
detector, SAM and captioner then run batched), and falls back to one image at a time when that call fails, so
that only the bad image is quarantined."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd

from reflade.engine.pipeline import SceneStage, Work
from reflade.engine.schema import encode_png
from reflade.engine.types import Entity


class _Recorder:
    """A scene backend that records its calls and finds ``i`` entities in image ``i`` (its pixel value)."""

    def __init__(self, fail_on: int | None = None):
        self.batch_calls: list[int] = []
        self.single_calls = 0
        self.fail_on = fail_on

    def _one(self, image):
        i = int(image[0, 0, 0])
        if i == self.fail_on:
            raise ValueError("bad image")
        mask = np.ones(image.shape[:2], bool)
        return [Entity(k, (0, 0, 1, 1), mask, "cup", 0.5, caption="a cup") for k in range(i)]

    def detect(self, image):
        self.single_calls += 1
        return self._one(image)

    def detect_batch(self, images):
        self.batch_calls.append(len(images))
        return [self._one(im) for im in images]


def _stage(backend) -> SceneStage:
    stage = SceneStage.__new__(SceneStage)  # no registry or weights: the backend is given
    stage.family, stage.cfg, stage.registry, stage.backend = "neural", None, None, backend
    return stage


def _batch(n: int, ok=None) -> pd.DataFrame:
    rows = []
    for i in range(n):
        work = Work(image_png=encode_png(np.full((8, 10, 3), i, np.uint8)))
        good = True if ok is None else ok[i]
        rows.append({"source_id": f"s{i}", "ok": good, "stage": "", "reason": "", "work": pickle.dumps(work)})
    return pd.DataFrame(rows)


def test_one_backend_call_for_the_whole_batch():
    backend = _Recorder()
    out = _stage(backend)(_batch(4, ok=[True, True, False, True]))
    assert backend.batch_calls == [3] and backend.single_calls == 0  # the rejected row is not decoded
    # image 0 has no entity: quarantined like before
    assert list(out["ok"]) == [False, True, False, True] and out["reason"][0].startswith("no_entities")
    works = [pickle.loads(w) for w in out["work"]]
    assert [len(w.entities) for w in works] == [0, 1, 0, 3]
    assert works[3].image.shape == (8, 10, 3) and works[3].entities[0].caption == "a cup"
    assert works[1].counts["scene"] == [1, 1] and works[0].counts["scene"] == [1, 0]
    assert "scene" in works[1].timings and "scene" not in works[2].timings


def test_a_failing_batch_is_retried_image_by_image():
    backend = _Recorder(fail_on=2)
    out = _stage(backend)(_batch(4))
    assert backend.batch_calls == [4] and backend.single_calls == 4
    assert list(out["ok"]) == [False, True, False, True]
    assert out["stage"][2] == "scene" and "bad image" in out["reason"][2]
    assert [len(pickle.loads(w).entities) for w in out["work"]] == [0, 1, 0, 3]


def test_backends_without_detect_batch_run_per_image():
    class PerImage(_Recorder):
        detect_batch = None

    backend = PerImage()
    _stage(backend)(_batch(3))
    assert backend.single_calls == 3 and backend.batch_calls == []
