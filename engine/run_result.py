"""What a data-engine run reports: per-stage counts and times, the balance of images and layers, and the table
the CLI prints beside the paper's figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("prefilter", "dedup", "scene", "completion", "matting", "prompts", "postfilter")
IMAGE_STAGES = ("prefilter", "dedup", "scene")
# The paper's figures, printed beside ours.
PAPER_PREFILTER_PASS = 0.861
PAPER_END_TO_END = 0.70


@dataclass
class StageRow:
    """One stage of a run: units in and out (images for the image stages, layers after), seconds of work."""

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
    """A finished run: the registered dataset, the balance (images in = kept + quarantined, layers out = kept +
    rejected), per-stage rows and the quarantine reasons (``stage:reason_code`` -> count)."""

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
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds per part of this run: ``ingest``, ``plan``, ``connect`` (to Ray), ``barrier`` (read,
    pre-filter, near-duplicates), ``stages`` (stages 2-6 and the shard writer), ``synthetic``, ``commit``."""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["stages"] = [dict(s.__dict__, kept=s.kept) for s in self.stages]
        return d


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
