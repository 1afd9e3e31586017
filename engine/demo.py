"""The data engine's step of the main job: the bundled photos (already in the registry) and synthetic scenes
in, a dataset version out, the stage table on screen. It runs as a Ray job on the embedded head, the way a
platform team would submit it (``reflade jobs submit engine -- run ...``)."""

from __future__ import annotations

import json
import sys

DEMO_DATASET = "reflade-demo"
DEMO_SYNTHETIC = 48


def engine_step(cfg, registry, timer, made, console) -> None:
    from reflade.platform.jobs import Jobs

    with timer.step("data engine (Ray job: photos + synthetic scenes -> dataset)"):
        jobs = Jobs(cfg)
        # Half the synthetic scenes (whole scenes, by id) to train, so the training step has exact ground truth
        # to learn from; the other half stays in test for evaluation.
        args = [
            "run",
            "--input",
            made["photos"],
            "--dataset",
            DEMO_DATASET,
            "--synthetic",
            str(DEMO_SYNTHETIC),
            "--synthetic-split",
            "hash",
        ]
        job_id = jobs.submit("engine", args)
        console.print(f"submitted engine job {job_id}: reflade engine {' '.join(args)}")
        for chunk in jobs.follow(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        final = jobs.wait(job_id, timeout=900)
        if final != "SUCCEEDED":
            raise RuntimeError(f"engine job {job_id} ended {final}; see `reflade jobs logs {job_id}`")
        v = registry.resolve(f"dataset/{DEMO_DATASET}")
        stats = json.loads(registry.read_bytes(v, "stats.json"))
        made["dataset"] = v.ref
        console.print(
            f"{v.ref}: {stats['layers_kept']} layers ({stats['synthetic_rows']} synthetic), "
            f"{stats['images_quarantined']} images quarantined"
        )
