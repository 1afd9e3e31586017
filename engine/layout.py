"""How stages 2-6 sit on Ray: the staged layout (an actor pool per model stage) or the fused one (one actor class
running all five on each batch), the pools' sizes, how the input is cut into blocks, and the same stages as a
plain loop in one process (the benchmark's baseline)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from reflade.engine.config import EngineConfig
from reflade.engine.errors import EngineError
from reflade.engine.layer_units import GATHER_CPUS, GatherLayers, LayerMattingStage, split_layers
from reflade.engine.ray_stages import (
    CompletionStage,
    MarkDuplicates,
    MattingStage,
    PostFilterStage,
    PreFilterStage,
    PromptStage,
    SceneStage,
)
from reflade.engine.record_stage import Work, to_batch, to_records

LAYOUTS = ("auto", "staged", "fused")

# Input blocks of one batch each, up to this many. An actor takes a whole block per task, so the run's last block
# decides how long one actor works while the others idle: with blocks of one batch that tail is one batch. (Blocks
# were once capped at 64: a 1,028-image run then had blocks of 16 images and a 5 s tail on one of two cores.)
MAX_INPUT_BLOCKS = 4096


def largest_first(items: list, size: Callable[[Any], int]) -> list:
    """``items`` in the order the run feeds them to the stages: largest first (by ``size``, the file's bytes: a
    proxy for its pixels, and so for its stage time), ties in input order.

    Actors take blocks in order, so the last blocks decide how long one actor works on while the others have
    nothing left (the run's tail). Ending on the small images shortens that tail; a big photo that came last
    would keep one core busy for seconds alone. Only the order of work changes: near-duplicates are still
    resolved in input order (the first one is kept), sample ids do not depend on the order, and a re-run skips
    done sources by id whichever shard holds them."""
    return [it for _, it in sorted(enumerate(items), key=lambda p: (-size(p[1]), p[0]))]


def input_blocks(n_items: int, batch_size: int) -> int:
    """Blocks to split ``n_items`` input rows into: one per ``batch_size`` rows, at most ``MAX_INPUT_BLOCKS``."""
    return max(1, min(n_items, MAX_INPUT_BLOCKS, -(-n_items // max(1, batch_size))))


def uses_gpu(ecfg: EngineConfig, family: str) -> bool:
    """Whether the model stages' actors take GPUs (neural backends with ``num_gpus`` > 0)."""
    return family == "neural" and ecfg.num_gpus > 0


def _check_layout_settings(ecfg: EngineConfig) -> None:
    if ecfg.layout not in LAYOUTS:
        raise EngineError(f"engine.layout must be one of {', '.join(LAYOUTS)}, not {ecfg.layout!r}")
    if ecfg.fused_actors < 0:
        raise EngineError(f"engine.fused_actors must be 0 (one per CPU) or more, not {ecfg.fused_actors}")


def resolve_layout(ecfg: EngineConfig, family: str) -> str:
    """``staged`` or ``fused`` for this run (``auto``: fused for the classical backends, staged for neural ones,
    whose models would be loaded once per actor, that is once per CPU, in the fused layout)."""
    _check_layout_settings(ecfg)
    if ecfg.layout != "auto":
        return ecfg.layout
    return "staged" if family == "neural" else "fused"


def fused_pool_size(ecfg: EngineConfig, cluster_cpus: float | None = None, gpu: bool = False) -> int:
    """Actors of the fused layout: ``fused_actors``; else ``gpu_actors`` when the actors take GPUs; else one per
    CPU of the cluster (at least one)."""
    _check_layout_settings(ecfg)
    if ecfg.fused_actors:
        return ecfg.fused_actors
    if gpu:
        return ecfg.gpu_actors
    if cluster_cpus is None:
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cluster_cpus))


def describe_layout(ecfg: EngineConfig, family: str) -> str:
    """One line for the run's log: the layout and its pools."""
    gpu = uses_gpu(ecfg, family)
    if resolve_layout(ecfg, family) == "fused":
        return (
            f"stages 2-6 fused: {fused_pool_size(ecfg, gpu=gpu)} actors x {ecfg.num_cpus_per_actor:g} CPU"
            + (f" + {ecfg.num_gpus:g} GPU" if gpu else "")
        )
    pool = ecfg.gpu_actors if gpu else ecfg.cpu_actors
    return (
        f"stages 2-6 staged: scene and completion pools of {pool}, matting pool of {ecfg.cpu_actors} "
        "(one entity per call)"
    )


class LayerStages:
    """Stages 2-6 in one process (the fused layout's actor, and ``run_stages_plain``): the same stage objects
    as the staged layout, called in sequence on each batch, so that a batch never leaves the process between
    stages: no scheduling, no Arrow round trips, and each image's ``Work`` goes from stage to stage as the
    object itself (pickled once, by the last stage, instead of at every hand-off)."""

    def __init__(
        self,
        family: str,
        cfg: EngineConfig,
        storage_fields: dict[str, Any] | None = None,
        registry_prefix: str | None = None,
    ):
        args = (family, cfg, storage_fields, registry_prefix)
        self.stages = [
            SceneStage(*args),
            CompletionStage(*args),
            MattingStage(*args),
            PromptStage(cfg),
            PostFilterStage(cfg),
        ]
        for stage in self.stages[:-1]:
            stage.pickle_out = False

    def __call__(self, batch):
        for stage in self.stages:
            batch = stage(batch)
        # Images that left the run before the last stage (no entity found, say) still hold the object.
        if "work" in batch and any(isinstance(w, Work) for w in batch["work"]):
            batch["work"] = [pickle.dumps(w) if isinstance(w, Work) else w for w in batch["work"]]
        return batch


def completion_map_args(ecfg: EngineConfig, family: str, args: tuple) -> dict[str, Any]:
    """``map_batches`` arguments (but the class) of the staged layout's completion pool, whose constructor takes
    ``args`` (family, config, storage fields, registry prefix). For the neural family each actor runs
    ``completion_calls_in_flight`` calls at once, each in its own thread (Ray Data's
    ``max_concurrent_calls_per_actor`` with ``enable_true_multi_threading``), and its stage batches their holes
    together (engine/completion_batcher.py); the classical stages run one call at a time.

    Raises:
        EngineError: ``completion_calls_in_flight`` is below 1.
    """
    from ray.data import ActorPoolStrategy

    calls = ecfg.completion_calls_in_flight
    if calls < 1:
        raise EngineError(f"engine.completion_calls_in_flight must be 1 or more, not {calls}")
    gpu = uses_gpu(ecfg, family)
    pool = ecfg.gpu_actors if gpu else ecfg.cpu_actors
    calls = calls if family == "neural" else 1
    compute = (
        ActorPoolStrategy(size=pool, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True)
        if calls > 1
        else ActorPoolStrategy(size=pool)
    )
    return {
        "fn_constructor_args": args,
        "fn_constructor_kwargs": {"calls_in_flight": calls},
        "compute": compute,
        "num_cpus": ecfg.num_cpus_per_actor,
        "num_gpus": ecfg.num_gpus if gpu else 0,
        "batch_format": "pandas",
        "batch_size": ecfg.batch_size,
    }


def add_layer_stages(
    ds,
    ecfg: EngineConfig,
    family: str,
    storage_fields: dict[str, Any] | None = None,
    registry_prefix: str | None = None,
    layout: str | None = None,
    fused_class: type | None = None,
):
    """Append stages 2-6 (scene, completion, matting, prompts, post-filter) to a Ray dataset of pre-filtered
    image records, in the layout ``layout`` (default: ``resolve_layout``). Staged: model stages in actor pools
    (GPU pools for neural backends when ``num_gpus`` > 0), prompts and post-filter as tasks. Fused: one actor
    pool (``fused_pool_size``) running all five stages on each batch, as ``fused_class`` (default
    ``LayerStages``; a subclass with the same constructor, for instance one that times its calls).

    Two scheduling levers are the staged layout's: its completion actors run several calls at once and sample
    their holes together (:func:`completion_map_args`), and its matting pool takes one entity per call, so that
    an image's layers are matted in parallel (engine/layer_units.py). The fused layout (and the plain loop) call
    each stage once per batch in one thread, so they complete one batch at a time and matte an image's entities in
    sequence."""
    from ray.data import ActorPoolStrategy

    bs = ecfg.batch_size
    layout = layout or resolve_layout(ecfg, family)
    args = (family, ecfg, storage_fields, registry_prefix)
    gpu = uses_gpu(ecfg, family)
    if layout == "fused":
        return ds.map_batches(
            fused_class or LayerStages,
            fn_constructor_args=args,
            compute=ActorPoolStrategy(size=fused_pool_size(ecfg, gpu=gpu)),
            num_cpus=ecfg.num_cpus_per_actor,
            num_gpus=ecfg.num_gpus if gpu else 0,
            batch_format="pandas",
            batch_size=bs,
        )
    if layout != "staged":
        raise EngineError(f"unknown layout {layout!r} (staged or fused)")
    task = {"num_cpus": ecfg.num_cpus_per_task, "batch_format": "pandas", "batch_size": bs}
    model = {
        "num_cpus": ecfg.num_cpus_per_actor,
        "num_gpus": ecfg.num_gpus if gpu else 0,
        "batch_format": "pandas",
        "batch_size": bs,
    }
    cpu_actor = {"num_cpus": ecfg.num_cpus_per_actor, "batch_format": "pandas", "batch_size": bs}
    pool = ecfg.gpu_actors if gpu else ecfg.cpu_actors
    ds = ds.map_batches(SceneStage, fn_constructor_args=args, compute=ActorPoolStrategy(size=pool), **model)
    ds = ds.map_batches(CompletionStage, **completion_map_args(ecfg, family, args))
    # Matting is CPU work: its own pool, so that it overlaps the GPU stages; one entity per call, so that an
    # image's layers are matted in parallel (engine/layer_units.py).
    ds = ds.map_batches(split_layers, **task).repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        LayerMattingStage,
        fn_constructor_args=args,
        compute=ActorPoolStrategy(size=ecfg.cpu_actors),
        **dict(cpu_actor, batch_size=1),
    )
    ds = ds.map_batches(
        GatherLayers,
        compute=ActorPoolStrategy(size=1),
        num_cpus=GATHER_CPUS,
        batch_format="pandas",
        batch_size=bs,
    )
    ds = ds.map_batches(PromptStage(ecfg), **task)
    return ds.map_batches(PostFilterStage(ecfg), **task)


def run_stages_plain(
    records: list[dict[str, Any]],
    ecfg: EngineConfig,
    family: str = "classical",
    batch_size: int | None = None,
    storage_fields: dict[str, Any] | None = None,
    registry_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """The same stage code in one process, no Ray: records with ``source_id``, ``sha256``, ``name`` and the raw
    ``data`` bytes in, per-image records (with the pickled ``work``) out. The baseline of ``bench/engine.py``."""
    from reflade.engine.stages.prefilter import find_near_duplicates

    bs = batch_size or ecfg.batch_size
    rows = [dict(r, ok=True, stage="", reason="") for r in records]
    pre = PreFilterStage(ecfg)
    frames = [pre(to_batch(rows[i : i + bs])) for i in range(0, len(rows), bs)]
    done = [r for f in frames for r in to_records(f)]
    pairs = [(r["source_id"], int(r["phash"])) for r in done if r["ok"] and int(r["phash"])]
    mark = MarkDuplicates(find_near_duplicates(pairs, ecfg.dup_hamming))
    layers = LayerStages(family, ecfg, storage_fields, registry_prefix)
    out = []
    for i in range(0, len(done), bs):
        out += to_records(layers(mark(to_batch(done[i : i + bs]))))
    return out
