"""The serving step of the main job: an API token, the service deployed on the embedded head with the candidate
model, one held-out sample decomposed over HTTP through the Python client (the model and ``classical``), the layers
written to the demo's output folder; the service removed afterwards unless ``--keep``."""

from __future__ import annotations

from pathlib import Path

DEMO_SERVE_MODEL = "model/reflayer@candidate"
"""The demo serves the model it just trained (``production`` is moved only by a passing gate)."""


def serve_step(cfg, registry, timer, made, console) -> None:
    """The main job's serving step (entry point ``reflade.demo`` ``40-serve``)."""
    import dataclasses

    from reflade.engine.schema import decode_image, encode_png, load_rows
    from reflade.serve.cli import create_token, deploy, serve_settings
    from reflade.serve.client import Client

    dataset = made.get("dataset")
    if not dataset:
        raise RuntimeError("the serving step needs the engine step's dataset")
    with timer.step(f"serve {DEMO_SERVE_MODEL} on Ray Serve (FastAPI ingress + decomposer)"):
        token, path = create_token(cfg, "demo")
        settings = dataclasses.replace(serve_settings(cfg), model=DEMO_SERVE_MODEL)
        url = deploy(cfg, settings)
        made["serve_url"] = url
        console.print(f"service up: {url}; API token saved for this user in {path}")
    with timer.step("decompose a sample over HTTP (reflade.serve.client)"):
        rows = sorted(load_rows(registry, dataset, "test"), key=lambda r: r["sample_id"])
        row = next(r for r in rows if any(p.get("box") is not None for p in r["prompts"]))
        image = decode_image(row["image"], "RGB")
        box = next(list(p["box"]) for p in row["prompts"] if p.get("box") is not None)
        folder = Path(made.get("output") or "demo-output") / "served"
        folder.mkdir(parents=True, exist_ok=True)
        client = Client(url, token)
        for model in (None, "classical"):
            doc = client.decompose_json(image, {"box": box}, row["kind"], model=model, seed=0)
            name = (doc["model"].replace("/", "_").replace("@", "-")) + f"-{row['kind']}.png"
            (folder / name).write_bytes(encode_png(doc["layer"]))
            console.print(
                f"POST {url}/v1/decompose ({row['kind']}, box {box}) -> {doc['model']}: {folder / name} "
                f"({doc['timings']['total_s']:.2f} s, batch {doc['timings']['batch_size']})"
            )
    if not made.get("keep"):
        from ray import serve

        from reflade.serve.config import APP_NAME

        with timer.step("remove the service"):
            serve.delete(APP_NAME)
    else:
        console.print(f"service left running at {url} (`reflade serve down` removes it)")
