"""The plan of a data-engine run: everything decided before any stage runs, in one object that the execute and
commit steps take (``run.py``).

The run id hashes the dataset name, the input's content, the engine configuration, the backends and their exact
weights, and the synthetic part: the same command run again finds the same run, and its staged work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from reflade.engine.config import EngineConfig
from reflade.engine.staging import done_markers, done_source_ids


@dataclass
class RunPlan:
    """One run of the engine, planned.

    Attributes:
        dataset: the dataset name to register (``dataset/<dataset>``).
        family: the model stages' backends (``classical`` or ``neural``).
        ecfg: the engine configuration.
        inp: the ingested input (``reflade.engine.ingest.Input``: items, rejected records, manifest).
        weights: exact registry references of every weights version the backends use.
        config_hash: ``ecfg.fingerprint()``, part of every sample id.
        run_id: see the module docstring; ``run_prefix`` is ``runs/engine/<dataset>/<run_id>/``.
        backend_names: stage -> backend family, recorded in each row's provenance.
        storage_fields: the bucket's location as workers take it (no credentials).
        registry_prefix: the registry's prefix in the bucket.
        items: the distinct inputs (exact duplicates left out), in input order.
        exact_dups: (later copy, first copy) pairs of inputs with the same bytes: quarantined at commit.
        todo: the items no earlier attempt staged.
        skipped: how many items an earlier attempt staged already.
        synthetic: synthetic scenes to add as exact ground-truth rows; ``synthetic_size``: their side, pixels.
    """

    dataset: str
    family: str
    ecfg: EngineConfig
    inp: Any
    weights: list[str]
    config_hash: str
    run_id: str
    run_prefix: str
    backend_names: dict[str, str]
    storage_fields: dict[str, Any]
    registry_prefix: str
    items: list[Any] = field(default_factory=list)
    exact_dups: list[tuple[Any, Any]] = field(default_factory=list)
    todo: list[Any] = field(default_factory=list)
    skipped: int = 0
    synthetic: int = 0
    synthetic_size: int = 256


def run_id_of(
    dataset: str,
    content_hash: str,
    config_hash: str,
    family: str,
    weights: list[str],
    synthetic: int,
    size: int,
) -> str:
    """The run's id (see the module docstring)."""
    key = [dataset, content_hash, config_hash, family, weights, synthetic, size]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def make_plan(
    *,
    dataset: str,
    family: str,
    ecfg: EngineConfig,
    inp,
    weights: list[str],
    storage,
    storage_fields: dict[str, Any],
    registry_prefix: str,
    synthetic: int = 0,
    synthetic_size: int = 256,
) -> RunPlan:
    """Plan a run over ingested input ``inp``: its id and prefix, exact duplicates, and what is left to do after
    the markers an earlier attempt left under the run's prefix (read from ``storage``)."""
    config_hash = ecfg.fingerprint()
    run_id = run_id_of(dataset, inp.content_hash(), config_hash, family, weights, synthetic, synthetic_size)
    run_prefix = f"runs/engine/{dataset}/{run_id}/"
    # Exact duplicates (same bytes) are one source: the later copies are quarantined at once.
    first: dict[str, Any] = {}
    items, exact_dups = [], []
    for it in inp.items:
        if it.source_id in first:
            exact_dups.append((it, first[it.source_id]))
        else:
            first[it.source_id] = it
            items.append(it)
    done_ids = done_source_ids(done_markers(storage, run_prefix))
    todo = [it for it in items if it.source_id not in done_ids]
    backend_names = {"scene": family, "completion": family, "matting": "classical"}
    if family == "neural" and (ecfg.captioner_weights or "").strip():
        backend_names["captioner"] = "neural"  # its exact weights version is in provenance.weights
    return RunPlan(
        dataset=dataset,
        family=family,
        ecfg=ecfg,
        inp=inp,
        weights=weights,
        config_hash=config_hash,
        run_id=run_id,
        run_prefix=run_prefix,
        backend_names=backend_names,
        storage_fields=storage_fields,
        registry_prefix=registry_prefix,
        items=items,
        exact_dups=exact_dups,
        todo=todo,
        skipped=len(items) - len(todo),
        synthetic=synthetic,
        synthetic_size=synthetic_size,
    )
