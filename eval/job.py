"""The eval job: score a model and both baselines on a dataset split, report, register, gate, promote.

``reflade eval run`` and ``reflade jobs submit eval -- run ...`` both call :func:`run_eval`:

1. resolve every reference to its exact version (model, dataset, the three feature networks);
2. Ray Data: read the split's shards in place -> one item per (row, prompt type) -> a :class:`PredictStage` actor
   pool (every model, loaded once per actor, batched) -> a :class:`ScoreStage` actor pool (the feature networks,
   batched) -> materialised scored rows;
3. stream the scored rows (no pixels) through an :class:`~reflade.eval.summary.Accumulator`: the tables, FID from
   merged feature moments, HPA;
4. write the report (JSON + HTML, :mod:`reflade.eval.report`) and register it as an ``eval-report`` version whose
   parents are the exact model, dataset and feature-network versions;
5. with a baseline: the gate (:mod:`reflade.eval.gate`); with ``promote``: move ``production`` by compare-and-swap.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflade.eval.config import BASELINES, EvalConfig, parse_prompt_types
from reflade.eval.fid import FID_BACKGROUND
from reflade.eval.hpa import HPANormalization
from reflade.platform.errors import ReportedError

__all__ = ["EvalError", "EvalOutcome", "EvalRequest", "report_name", "run_eval", "run_key"]

PIXEL_COLUMNS = ("pred_png",)
COMPARABLE = ("dataset", "prompt_types", "max_samples", "networks", "metric_size", "fid_background")
"""Setup fields two reports must share for their numbers to be compared (the same rows, prompts and networks)."""
REPORT_KIND = "eval-report"


class EvalError(ReportedError):
    """An evaluation cannot run or cannot be compared; the message says what and why."""


@dataclass(kw_only=True)
class EvalRequest:
    """One ``reflade eval run``."""

    model: str
    """What is scored: a model reference (``model/reflayer@candidate``), ``classical`` or ``copy-visible``."""
    settings: EvalConfig = field(default_factory=EvalConfig)
    """The ``eval`` section with the command's flags applied."""
    baseline: str | None = None
    """A model reference to gate against (``model/reflayer@production``)."""
    promote: bool = False
    """Move ``production`` to the model when the gate passes."""
    allow_first: bool = False
    """With ``promote`` and no ``production`` yet: promote anyway (the first production model)."""
    output: Path | None = None
    """Also copy the report's files into this local folder."""


@dataclass
class EvalOutcome:
    """What a run produced."""

    report: dict[str, Any]
    """The report's JSON content."""
    version: Any
    """The registered ``eval-report`` version."""
    folder: Path | None
    """Local copy of the report's files (``request.output``), if asked for."""
    gate: Any = None
    """The :class:`~reflade.eval.gate.GateResult`, when a baseline was given."""
    promoted: str | None = None
    """What ``production`` now points at, when this run moved it."""


def report_name(subject: str) -> str:
    """The ``eval-report`` name of a subject: the model's name, or the baseline's (``classical``)."""
    if subject in BASELINES:
        return subject
    from reflade.platform.registry import Ref

    return Ref.parse(subject).name


def run_key(report: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two reports' numbers to be comparable."""
    return {k: report["setup"].get(k) for k in COMPARABLE}


def _split_of(ref: str) -> tuple[str, str]:
    from reflade.platform.registry import Ref

    r = Ref.parse(ref)
    return dataclasses.replace(r, split=None).__str__(), r.split or "test"


def _network_refs(registry, s: EvalConfig) -> tuple[dict[str, str], bool]:
    refs, stand_in = {}, False
    for key, ref in (("lpips", s.lpips_net), ("clip", s.clip_net), ("inception", s.inception_net)):
        try:
            v = registry.resolve(ref)
        except Exception as e:
            raise EvalError(
                f"feature network {key} ({ref}) is not in the registry: {e}. Import the published weights "
                "(`reflade eval convert-weights` then `reflade registry import`, see the README) or use the "
                "stand-ins (`reflade eval stand-in-weights`, then --stand-in)"
            ) from None
        refs[key] = v.ref
        stand_in = stand_in or bool(v.metadata.get("random_init"))
    return refs, stand_in


def _resolve_subject(registry, spec: str) -> str:
    if spec in BASELINES:
        return spec
    from reflade.train.bundle import BUNDLE_FILE

    v = registry.resolve(spec)
    if v.kind != "model":
        raise EvalError(f"{v.ref} is a {v.kind}; --model takes a model reference, classical or copy-visible")
    # Checked here, where it is one line, rather than as a failed actor start inside Ray Data.
    if BUNDLE_FILE not in {f["path"] for f in v.files}:
        raise EvalError(f"{v.ref} is not a RefLayer model (no {BUNDLE_FILE} among its files)")
    return v.ref


def _dataset_rows(ds, s: EvalConfig):
    if s.max_samples:
        ds = ds.sort("sample_id").limit(s.max_samples)
    return ds


def run_eval(cfg, request: EvalRequest, *, log: Callable[[str], None] = print) -> EvalOutcome:
    """Run one evaluation on the configured Ray cluster; see the module docstring.

    Raises:
        EvalError: a reference that is not what it should be, a dataset split without rows of the prompt types,
            an incomparable baseline.
        GateFailed: the gate fails (the report is registered first).
    """
    from reflade.eval import gate as gating
    from reflade.eval.report import write_report
    from reflade.platform.registry import Registry

    s = request.settings
    s.validate()
    registry = Registry.from_config(cfg)
    prompt_types = parse_prompt_types(s.prompt_types)
    subject = _resolve_subject(registry, request.model)
    dataset_ref, split = _split_of(s.dataset)
    dataset = registry.resolve(dataset_ref)
    if dataset.kind != "dataset":
        raise EvalError(f"{dataset.ref} is a {dataset.kind}, not a dataset")
    networks, stand_in = _network_refs(registry, s)
    normalization = HPANormalization.from_dict(s.bounds) if s.bounds else HPANormalization()
    setup = {
        "dataset": f"{dataset.ref}:{split}",
        "prompt_types": list(prompt_types),
        "max_samples": s.max_samples,
        "networks": networks,
        "stand_in": stand_in,
        "metric_size": s.metric_size,
        "fid_background": list(FID_BACKGROUND),
        "steps": s.steps,
        "guidance": s.guidance,
        "seed": s.seed,
        "normalization": normalization.to_dict(),
    }
    models = [subject] + [b for b in BASELINES if b != subject]

    # The gate's baseline: its report on the same setup when there is one, else scored in this run.
    baseline_ref, baseline_report, production = None, None, None
    if request.promote:
        if subject in BASELINES:
            raise EvalError(f"--promote needs a model reference; {subject} is a baseline")
        from reflade.platform.registry import Ref

        r = Ref.parse(subject)
        # What production points at now: the promotion's compare-and-swap expects exactly this version.
        production = registry.aliases(r.kind, r.name).get(gating.PRODUCTION)
    if request.baseline or request.promote:
        baseline_ref, baseline_report = gating.find_baseline(
            registry, request.baseline or gating.production_of(subject), setup, log=log
        )
        if baseline_ref and baseline_report is None and baseline_ref not in models:
            models.append(baseline_ref)

    acc, scored = _score(cfg, registry, dataset, split, models, networks, prompt_types, s, log)
    acc_tables = acc.tables()
    log(f"scored {len({r['item_id'] for r in acc.samples})} items x {len(models)} models")

    with tempfile.TemporaryDirectory(prefix="reflade-eval-") as tmp:
        folder = Path(request.output) if request.output else Path(tmp) / "report"
        report = write_report(
            folder,
            subject=subject,
            models=models,
            setup=setup,
            tables=acc_tables,
            samples=acc.samples,
            pictures=lambda ids: _pictures(registry, dataset, scored, ids, models),
            report_samples=s.report_samples,
        )
        parents = [dataset.ref, *networks.values()] + ([subject] if subject not in BASELINES else [])
        version = registry.create(
            REPORT_KIND,
            report_name(subject),
            folder,
            metadata={"subject": subject, "setup": setup, "title": report["title"]},
            metrics=report["headline"],
            parents=parents,
            dedup=False,
            progress=False,
        )
        log(f"registered {version.ref} (parents: {', '.join(version.parents)})")
        outcome = EvalOutcome(report=report, version=version, folder=folder if request.output else None)
    if baseline_ref:
        if baseline_report is None:
            baseline_report = gating.report_for(report, baseline_ref)
        outcome.gate = gating.check(report, baseline_report, s.gate_margins, baseline=baseline_ref)
        log(outcome.gate.summary())
        if not outcome.gate.passed:
            raise gating.GateFailed(outcome.gate.summary())
    if request.promote:
        outcome.promoted = gating.promote(
            registry, subject, production, allow_first=request.allow_first, log=log
        )
    return outcome


def _score(cfg, registry, dataset, split, models, networks, prompt_types, s: EvalConfig, log):
    """Ray Data: items -> predictions -> scores; returns the accumulator and the materialised scored dataset."""
    from ray.data import ActorPoolStrategy

    from reflade.engine.schema import read_dataset
    from reflade.eval.scoring import PredictStage, ScoreStage, expand_row
    from reflade.eval.summary import Accumulator
    from reflade.platform.cluster import connect
    from reflade.platform.worker import storage_fields

    connect(cfg)
    _check_room(s)
    fields = storage_fields(cfg)
    prefix = cfg.registry.prefix
    device = "cuda" if s.num_gpus > 0 else "cpu"
    ds = _dataset_rows(read_dataset(registry, dataset.ref, split), s)
    # Blocks of one batch each: a shard is read as one block, and without this the whole split would reach the
    # pools as one block (one actor busy, scoring waiting for the last prediction).
    items = ds.flat_map(lambda row: expand_row(row, prompt_types)).repartition(
        target_num_rows_per_block=s.batch_size
    )
    common = {
        "num_cpus": s.num_cpus,
        "num_gpus": s.num_gpus,
        "batch_format": "pandas",
        "batch_size": s.batch_size,
    }
    predicted = items.map_batches(
        PredictStage,
        fn_constructor_args=(models, s.metric_size, fields, prefix),
        compute=ActorPoolStrategy(size=s.predict_actors),
        fn_constructor_kwargs={
            "steps": s.steps,
            "guidance": s.guidance,
            "seed": s.seed,
            "device": device,
            "threads": s.threads,
            "cache_dir": s.weights_cache or None,
        },
        **common,
    )
    scored = predicted.map_batches(
        ScoreStage,
        fn_constructor_args=(models, s.metric_size, networks, fields, prefix),
        compute=ActorPoolStrategy(size=s.score_actors),
        fn_constructor_kwargs={
            "device": device,
            "threads": s.threads,
            "cache_dir": s.weights_cache or None,
            "bf16": s.bf16,
        },
        **common,
    ).materialize()
    acc = Accumulator(HPANormalization.from_dict(s.bounds) if s.bounds else HPANormalization())
    columns = [c for c in scored.columns() if c not in PIXEL_COLUMNS]
    for batch in scored.select_columns(columns).iter_batches(batch_format="pandas", batch_size=512):
        acc.add(batch.to_dict("records"))
    if not acc.samples:
        raise EvalError(
            f"{dataset.ref}:{split} has no rows with prompts of type {', '.join(prompt_types)} "
            "(see `reflade data stats`)"
        )
    return acc, scored


def _check_room(s: EvalConfig) -> None:
    """Refuse CPU pools that leave the streaming read no core: Ray Data would wait forever, without an error."""
    import ray

    if s.num_gpus > 0:
        return  # GPU pools: an autoscaling cluster may add the nodes they ask for
    have = float(ray.cluster_resources().get("CPU", 0.0))
    pools = (s.predict_actors + s.score_actors) * s.num_cpus
    if pools + 1.0 > have + 1e-9:
        raise EvalError(
            f"the actor pools ask for {pools:g} CPUs ({s.predict_actors} + {s.score_actors} actors x "
            f"eval.num_cpus {s.num_cpus:g}) and the read tasks need 1 more, but the cluster has {have:g}: the job "
            "would wait forever; lower eval.num_cpus or the actor counts"
        )


def _pictures(registry, dataset, scored, item_ids: list[str], models: list[str]) -> dict[str, dict[str, Any]]:
    """For the report's grid: per item id, the image, the prompt, the ground truth and every model's prediction
    (PNG bytes at the metric frame)."""
    import pyarrow.parquet as pq

    from reflade.engine.schema import shard_files

    wanted = set(item_ids)
    out: dict[str, dict[str, Any]] = {i: {"preds": {}} for i in item_ids}
    for batch in scored.select_columns(["item_id", "model", "pred_png"]).iter_batches(
        batch_format="pandas", batch_size=512
    ):
        for r in batch[batch["item_id"].isin(wanted)].to_dict("records"):
            out[r["item_id"]]["preds"][r["model"]] = r["pred_png"]
    by_sample: dict[str, list[str]] = {}
    for item_id in item_ids:
        by_sample.setdefault(item_id.split("/", 1)[0], []).append(item_id)
    for f in shard_files(dataset):
        # Only the few rows shown: the filter skips row groups whose sample_id statistics exclude them.
        table = pq.read_table(
            registry.storage.path(dataset.key(f["path"])),
            filesystem=registry.storage.fs,
            filters=[("sample_id", "in", sorted(by_sample))],
        )
        for row in table.to_pylist():
            for item_id in by_sample.get(row["sample_id"], []):
                out[item_id]["row"] = row
    return out
