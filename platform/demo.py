"""The main job (``make demo`` / ``reflade demo``), first cut: bring the embedded stack up, put real bundled
photos into the registry, show them, run a job on the Ray head, bring the stack down.

Later packages extend this same command with their steps (data engine, training, eval, serving); each step
is timed and the table printed at the end.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from reflade.platform.config import Config

# scikit-image's bundled photos: real images available offline. Licences as scikit-image documents them.
SAMPLE_PHOTOS = {
    "astronaut": "public domain (NASA, via scikit-image)",
    "coffee": "CC0 (Rachel Michetti, via scikit-image)",
    "chelsea": "CC0 (Stefan van der Walt, via scikit-image)",
    "rocket": "public domain (SpaceX, via scikit-image)",
}


def write_sample_photos(folder: Path) -> dict[str, Path]:
    """Write the bundled scikit-image photos as PNG files; returns {name: path}."""
    import skimage.data
    import skimage.io

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in SAMPLE_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            skimage.io.imsave(path, getattr(skimage.data, name)(), check_contrast=False)
        out[name] = path
    return out


def _extension_steps():
    """Steps that later packages add to the main job (entry-point group ``reflade.demo``, in name order).

    Each is ``step(cfg, registry, timer, made, console)``: it opens its own ``timer.step(...)`` blocks and
    records what it made in ``made``.
    """
    from importlib.metadata import entry_points

    return [ep.load() for ep in sorted(entry_points(group="reflade.demo"), key=lambda e: e.name)]


class StepTimer:
    def __init__(self, console: Console):
        self.console = console
        self.rows: list[tuple[str, float, str]] = []

    @contextmanager
    def step(self, name: str):
        self.console.rule(f"[bold]{name}")
        t0 = time.monotonic()
        status = "failed"
        try:
            yield
            status = "ok"
        finally:
            self.rows.append((name, time.monotonic() - t0, status))

    def table(self) -> Table:
        table = Table("step", "seconds", "status", title="demo steps")
        for name, secs, status in self.rows:
            table.add_row(name, f"{secs:.1f}", status)
        table.add_row("[bold]total", f"[bold]{sum(r[1] for r in self.rows):.1f}", "")
        return table


def run_demo(
    cfg: Config, *, keep: bool = False, output: Path = Path("demo-output"), console: Console | None = None
) -> dict[str, Any]:
    """Run the main job. Returns what it made (references, job id)."""
    from reflade.platform.cluster import use_embedded_auth
    from reflade.platform.jobs import Jobs
    from reflade.platform.registry import Registry
    from reflade.platform.stack import EmbeddedStack

    console = console or Console()
    timer = StepTimer(console)
    stack = EmbeddedStack(cfg.stack, cfg.storage)
    was_running = bool(stack.read_state()) and stack.status().get("healthy", False)
    made: dict[str, Any] = {"output": output, "keep": keep}
    output.mkdir(parents=True, exist_ok=True)
    try:
        with timer.step("stack up (SeaweedFS + Ray head)"):
            state = stack.up(log=console.print)
            use_embedded_auth(state)
        registry = Registry.from_config(cfg)
        with timer.step("import bundled photos into the registry"):
            photos = write_sample_photos(output / "photos")
            licences = "; ".join(f"{n}: {lic}" for n, lic in SAMPLE_PHOTOS.items())
            v = registry.create(
                "raw-images",
                "skimage-samples",
                output / "photos",
                license=licences,
                source="scikit-image data module (skimage.data)",
                metadata={"count": len(photos)},
            )
            made["photos"] = v.ref
            console.print(f"{'reused' if v.reused else 'registered'} {v.ref}: {len(v.files)} files")
        with timer.step("show it"):
            v = registry.resolve("raw-images/skimage-samples")
            table = Table("file", "bytes", "sha256", "uri", title=v.ref)
            for f in v.files:
                table.add_row(f["path"], str(f["size"]), f["sha256"][:16], v.uri(f["path"]))
            console.print(table)
            console.print(f"license: {v.manifest['license']}")
        with timer.step("job on the Ray head (doctor: shipped wheel, bucket reachable from workers)"):
            jobs = Jobs(cfg)
            job_id = jobs.submit("doctor", [])
            final = jobs.wait(job_id, timeout=300)
            line = next((ln for ln in jobs.logs(job_id).splitlines() if ln.startswith("REFLADE_DOCTOR ")), "")
            console.print(f"job {job_id}: {final}")
            if line:
                import json

                doc = json.loads(line.split(" ", 1)[1])
                console.print(
                    f"  reflade {doc['reflade_version']} on Ray {doc['ray_version']}; storage "
                    f"{doc['storage'].get('status')} ({doc['storage'].get('endpoint', '')})"
                )
            if final != "SUCCEEDED":
                raise RuntimeError(f"doctor job {job_id} ended {final}; see `reflade jobs logs {job_id}`")
            made["doctor_job"] = job_id
        for step in _extension_steps():
            step(cfg, registry, timer, made, console)
    finally:
        if keep or was_running:
            st = stack.read_state()
            if st:
                console.print(
                    f"stack left running: S3 {st['seaweedfs']['endpoint']} (credentials in {st['credentials_file']}), "
                    f"Ray {st['ray']['address']}, dashboard {st['ray']['dashboard_url']} (token in "
                    f"{st['ray']['token_file']}); `reflade down` stops it"
                )
        else:
            with timer.step("stack down"):
                stack.down(log=console.print)
        console.print(timer.table())
    return made
