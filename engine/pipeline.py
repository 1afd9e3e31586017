"""The data engine's public names, where the rest of the platform imports them from.

The engine itself is split along its exactly-once seam (see ``docs/engine.md``):

| module | what it is |
|---|---|
| ``run.py`` | the run: ingest -> plan -> execute -> commit (``run_engine``) |
| ``plan.py`` | the plan of a run (``RunPlan``): its id, prefix, what is left to do |
| ``record_stage.py`` | an image record (``Work``, ``LayerOut``) and the one Ray Data adapter over records |
| ``ray_stages.py`` | the stages as record stages (read, pre-filter, near-duplicates, scene ... post-filter) |
| ``layout.py`` | staged or fused on Ray, pool sizes, input blocks, the plain loop of the benchmark |
| ``staging.py`` | shard writer, done markers, shard names and splits |
| ``commit.py`` | the commit: staged shards -> a dataset version, in place |
| ``ground_truth.py`` | synthetic scenes as exact ground-truth rows |
| ``run_result.py`` | what a run reports (``RunResult``, ``stage_table``) |
"""

from __future__ import annotations

from reflade.engine.commit import commit
from reflade.engine.errors import EngineError
from reflade.engine.ground_truth import stage_synthetic, synthetic_rows
from reflade.engine.layout import (
    LAYOUTS,
    MAX_INPUT_BLOCKS,
    LayerStages,
    add_layer_stages,
    fused_pool_size,
    input_blocks,
    largest_first,
    resolve_layout,
    run_stages_plain,
)
from reflade.engine.plan import RunPlan, make_plan
from reflade.engine.ray_stages import (
    CompletionStage,
    MarkDuplicates,
    MattingStage,
    PostFilterStage,
    PreFilterStage,
    PromptStage,
    ReadRaw,
    SceneStage,
)
from reflade.engine.record_stage import LayerOut, RecordStage, Work
from reflade.engine.record_stage import to_batch as _frame
from reflade.engine.record_stage import to_records as _rows
from reflade.engine.run import build_dataset, execute, run_engine
from reflade.engine.run_result import IMAGE_STAGES, STAGES, RunResult, StageRow, stage_table
from reflade.engine.schema import ENGINE_VERSION, make_sample_id
from reflade.engine.staging import ShardWriter, done_markers, shard_name, split_for

__all__ = [
    "ENGINE_VERSION",
    "IMAGE_STAGES",
    "LAYOUTS",
    "MAX_INPUT_BLOCKS",
    "STAGES",
    "CompletionStage",
    "EngineError",
    "LayerOut",
    "LayerStages",
    "MarkDuplicates",
    "MattingStage",
    "PostFilterStage",
    "PreFilterStage",
    "PromptStage",
    "ReadRaw",
    "RecordStage",
    "RunPlan",
    "RunResult",
    "SceneStage",
    "ShardWriter",
    "StageRow",
    "Work",
    "_frame",
    "_rows",
    "add_layer_stages",
    "commit",
    "done_markers",
    "build_dataset",
    "execute",
    "fused_pool_size",
    "input_blocks",
    "largest_first",
    "make_plan",
    "make_sample_id",
    "resolve_layout",
    "run_engine",
    "run_stages_plain",
    "shard_name",
    "split_for",
    "stage_synthetic",
    "stage_table",
    "synthetic_rows",
]
