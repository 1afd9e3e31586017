"""The decomposer deployment's batched code path without Ray: grouping, one call per group, refusals isolated."""

from __future__ import annotations

import numpy as np

from reflade.engine.classical_decomposer import ClassicalDecomposer
from reflade.engine.synth import make_scene
from reflade.serve.batching import decompose_group, group_items


def _item(prompt, **kw):
    scene = make_scene(4, size=(48, 64), n_objects=(2, 2))
    return {
        "image": scene.image,
        "prompt": prompt,
        "kind": "foreground",
        "steps": 2,
        "guidance": 1.0,
        "seed": 0,
        "model": "classical",
        **kw,
    }


def test_items_group_by_model_steps_and_guidance():
    items = [_item({}), _item({}, steps=3), _item({}), _item({}, model="model/m@1"), _item({}, guidance=2.0)]
    assert list(group_items(items).values()) == [[0, 2], [1], [3], [4]]


class _Counting:
    """Classical, counting its calls and batch sizes."""

    def __init__(self):
        self.inner, self.calls = ClassicalDecomposer(), []

    def decompose(self, images, prompts, kinds, **kw):
        self.calls.append(len(images))
        return self.inner.decompose(images, prompts, kinds, **kw)


def test_one_call_per_group_and_a_refusal_fails_only_its_own_item():
    box = [int(v) for v in make_scene(4, size=(48, 64), n_objects=(2, 2)).objects[0].box]
    model = _Counting()
    good = decompose_group(model, [_item({"box": box}), _item({"box": box}, kind="background")])
    assert model.calls == [2]
    assert [r["batch_size"] for r in good] == [2, 2]
    assert all(r["layer"].shape == (48, 64, 4) and r["layer"].dtype == np.uint8 for r in good)
    model.calls.clear()
    mixed = decompose_group(model, [_item({"box": box}), _item({"text": "the red shape"})])
    assert "layer" in mixed[0] and mixed[0]["batch_size"] == 1
    assert set(mixed[1]) == {"error"} and "text" in mixed[1]["error"].lower()
    # The pair refused before compute, then each alone: the good one decomposed, the text-only one refused again.
    assert model.calls == [2, 1, 1]


def test_the_item_the_ingress_builds_and_the_replica_dtype():
    from reflade.serve.batching import replica_dtype, request_item
    from reflade.serve.requests import DecomposeRequest

    image = np.zeros((8, 8, 3), np.uint8)
    req = DecomposeRequest(image=image, prompts=[{"box": [0, 0, 4, 4]}], kind="background", seed=7)
    item = request_item(req, req.prompts[0], model="model/m@2", default_steps=20)
    assert (
        item["steps"] == 20 and item["guidance"] == 1.0 and item["seed"] == 7 and item["kind"] == "background"
    )
    req.steps, req.guidance = 3, 2.5
    item = request_item(req, req.prompts[0], model="classical", default_steps=20)
    assert (item["steps"], item["guidance"], item["model"]) == (3, 2.5, "classical")
    assert item["image"] is image and set(group_items([item])) == {("classical", 3, 2.5)}
    assert replica_dtype(True, "cuda") == "bfloat16" and replica_dtype(True, "cuda:1") == "bfloat16"
    assert replica_dtype(False, "cuda") is None and replica_dtype(True, "cpu") is None
