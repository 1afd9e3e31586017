"""Pairwise human preference through the service (the ``/vote`` page): pairs of layers to judge, and votes recorded
in the registry as ``votes/NAME`` versions that :mod:`reflade.eval.elo` turns into ELO ratings.

- ``GET /v1/vote/pair?dataset=REF&a=MODEL&b=MODEL[&prompt_type=TYPE][&seed=N]``: one row of the dataset's test split
  (or the reference's ``:SPLIT``) and one of its prompts, sampled at random, decomposed by both models with the same
  seed; which model is shown as A (left) is random. The answer holds the image and both layers as base64 PNGs, the
  item (``SAMPLE_ID/TYPE:GRANULARITY``, the eval package's item id), the prompt and a description of it.
- ``POST /v1/votes`` ``{"name", "item", "prompt", "model_a", "model_b", "winner"}`` (winner ``a``, ``b`` or
  ``tie``): checked by the ELO module's own rules and recorded as a new version of ``votes/NAME`` holding every vote
  of that name so far; the answer names the version.

Votes of one name are appended one at a time under a lock of the ingress replica: the ingress runs as one replica
(the app's default), so no vote is lost. (With several ingress replicas, two votes at the same instant could each
make a version without the other's vote; the registry itself stays consistent.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from reflade.eval.elo import VOTES_KIND, WINNERS, Vote, VoteError, parse_votes, read_votes, register_votes
from reflade.serve.errors import ApiError

__all__ = [
    "PairItem",
    "VoteBook",
    "describe_prompt",
    "make_pair",
    "parse_vote",
    "read_vote_body",
    "prompt_for_page",
    "sample_item",
]

DEFAULT_SPLIT = "test"
VOTE_FIELDS = ("name", "item", "prompt", "model_a", "model_b", "winner")
"""Keys of a ``POST /v1/votes`` body."""
MAX_VOTE_BYTES = 16_384
"""Largest ``POST /v1/votes`` body, bytes."""
_MAX_FIELD = 300  # characters of one vote field (item ids and model references are far shorter)
_MAX_PARAM = 200
# Sampled prompts tried before a pair is refused (a model may refuse a prompt type: classical takes no text alone).
_TRIES = 4
_ROW_COLUMNS = ["sample_id", "kind", "prompts"]


@dataclass
class PairItem:
    """One (dataset row, prompt) to show two models' layers for.

    Attributes:
        dataset: the exact dataset version (``dataset/NAME@N``).
        split: the split it was sampled from.
        sample_id: the row's id.
        item: ``SAMPLE_ID/TYPE:GRANULARITY`` (the eval package's item id).
        prompt_type: ``TYPE:GRANULARITY`` (``text+box:fine``).
        kind: ``foreground`` or ``background``.
        image: HxWx3 uint8 RGB, the row's image.
        prompt: the prompt in the sample format (mask as PNG bytes or None).
    """

    dataset: str
    split: str
    sample_id: str
    item: str
    prompt_type: str
    kind: str
    image: np.ndarray
    prompt: dict[str, Any]


# ---------------------------------------------------------------------------------------------- pairs
def sample_item(registry, dataset: str, rng: random.Random, prompt_type: str | None = None) -> PairItem:
    """A random row of a dataset split and a random prompt of it, read from the version's shards in place.

    Args:
        dataset: ``dataset/NAME[@VERSION|@ALIAS][:SPLIT]``; the split defaults to ``test``.
        rng: the source of every random choice (shard order, row, prompt).
        prompt_type: only prompts of this type: ``box`` (any granularity) or ``box:fine``.

    Raises:
        ApiError: 422 ``invalid_dataset`` (a malformed reference, not a dataset), 404 ``unknown_dataset``, 404
            ``no_items`` (no row of the split, or none with a prompt of ``prompt_type``).
    """
    import pyarrow.parquet as pq

    from reflade.engine.schema import check_schema, decode_image, shard_files
    from reflade.eval.scoring import prompt_type_of
    from reflade.platform.registry import Ref, RegistryError

    try:
        ref = Ref.parse(dataset)
    except RegistryError as e:
        raise ApiError(422, "invalid_dataset", str(e)) from None
    if ref.kind != "dataset":
        raise ApiError(422, "invalid_dataset", f"{dataset} is a {ref.kind} reference, not dataset/NAME")
    try:
        version = registry.resolve(ref)
    except RegistryError as e:
        raise ApiError(404, "unknown_dataset", str(e)) from None
    split = ref.split or DEFAULT_SPLIT
    fs = registry.storage.fs
    paths = [registry.storage.path(version.key(f["path"])) for f in shard_files(version)]
    rng.shuffle(paths)
    for path in paths:
        check_schema(pq.read_schema(path, filesystem=fs), where=f"{version.ref}: {path}")
        # The prompts of the split's rows first; the one image shown is read alone (the eval report's way).
        rows = pq.read_table(path, filesystem=fs, columns=_ROW_COLUMNS, filters=[("split", "=", split)])
        candidates = [
            (row, prompt)
            for row in rows.to_pylist()
            for prompt in row["prompts"] or []
            if _type_matches(prompt_type_of(prompt), prompt_type)
        ]
        if not candidates:
            continue
        row, prompt = candidates[rng.randrange(len(candidates))]
        table = pq.read_table(
            path, filesystem=fs, columns=["image"], filters=[("sample_id", "=", row["sample_id"])]
        )
        ptype = prompt_type_of(prompt)
        return PairItem(
            dataset=version.ref,
            split=split,
            sample_id=row["sample_id"],
            item=f"{row['sample_id']}/{ptype}",
            prompt_type=ptype,
            kind=row["kind"],
            image=decode_image(table.column("image")[0].as_py(), "RGB"),
            prompt=prompt,
        )
    wanted = f" with a prompt of type {prompt_type!r}" if prompt_type else ""
    raise ApiError(404, "no_items", f"{version.ref} has no row in split {split!r}{wanted}")


def _type_matches(ptype: str, wanted: str | None) -> bool:
    if not wanted:
        return True
    return ptype == wanted if ":" in wanted else ptype.split(":", 1)[0] == wanted


def prompt_for_page(prompt: dict[str, Any]) -> dict[str, Any]:
    """A sample-format prompt as JSON for the page: ``type``, ``granularity``, ``points``, ``box``, ``text`` and
    ``mask_png`` (base64 PNG, 0/255, or None)."""
    mask = prompt.get("mask")
    return {
        "type": prompt.get("type"),
        "granularity": prompt.get("granularity") or "fine",
        "points": [[int(v) for v in p] for p in prompt.get("points") or []],
        "box": None if prompt.get("box") is None else [int(v) for v in prompt["box"]],
        "text": prompt.get("text"),
        "mask_png": base64.b64encode(bytes(mask)).decode() if mask else None,
    }


def describe_prompt(prompt: dict[str, Any], kind: str) -> str:
    """What a person judges, for the page: ``the object given by "a red disc" + box (4, 6)-(30, 28), complete (its
    foreground layer)``, or ``the scene without the object given by ... (the background layer)``."""
    parts = []
    if prompt.get("text"):
        parts.append(json.dumps(prompt["text"], ensure_ascii=False))
    if prompt.get("box") is not None:
        x0, y0, x1, y1 = (int(v) for v in prompt["box"])
        parts.append(f"box ({x0}, {y0})-({x1}, {y1})")
    points = prompt.get("points") or []
    if points:
        pos = sum(1 for p in points if int(p[2]) == 1)
        parts.append(f"{pos} positive, {len(points) - pos} negative point(s)")
    if prompt.get("mask"):
        parts.append("the blue mask")
    given = "the object given by " + " + ".join(parts or ["(an empty prompt)"])
    if kind == "background":
        return f"the scene without {given} (the background layer)"
    return f"{given}, complete (its foreground layer)"


async def make_pair(
    query: Mapping[str, str],
    registry,
    resolve: Callable[[str], Awaitable[str]],
    run: Callable[[Any, dict[str, Any], str], Awaitable[dict[str, Any]]],
    steps: int,
) -> dict[str, Any]:
    """The answer of ``GET /v1/vote/pair`` (see the module's docstring).

    Args:
        query: the request's query parameters: ``dataset``, ``a``, ``b`` (required), ``prompt_type``, ``seed``.
        resolve: the ingress's model resolution (a reference -> the exact version, or ``classical``).
        run: the ingress's decomposition of one prompt by one model (``(request, prompt, model) -> result``).
        steps: sampling steps (the service's default).

    Raises:
        ApiError: 422 ``missing_field`` / ``invalid_field`` / ``same_model``, the errors of :func:`sample_item` and
            of ``resolve``; 422 ``refused`` when the models refused every sampled prompt.
    """
    from reflade.engine.schema import encode_png
    from reflade.serve.requests import DecomposeRequest

    unknown = sorted(set(query) - {"dataset", "a", "b", "prompt_type", "seed"})
    if unknown:
        raise ApiError(
            422, "unknown_field", f"unknown parameters {unknown} (known: dataset, a, b, prompt_type, seed)"
        )
    dataset, a, b = (_param(query, k) for k in ("dataset", "a", "b"))
    prompt_type = query.get("prompt_type") or None
    if prompt_type is not None and (len(prompt_type) > _MAX_PARAM or not prompt_type.isprintable()):
        raise ApiError(422, "invalid_field", "prompt_type must be a prompt type such as box or text+box:fine")
    seed = query.get("seed")
    if seed is not None and not (seed.isascii() and seed.isdigit() and int(seed) < 2**63):
        raise ApiError(422, "invalid_field", f"seed must be an integer in [0, 2**63), got {seed[:40]!r}")
    seed = int(seed) if seed is not None else secrets.randbits(63)
    models = [await resolve(a), await resolve(b)]
    if models[0] == models[1]:
        raise ApiError(
            422, "same_model", f"a and b are both {models[0]}: a vote compares two different models"
        )
    rng = random.Random(seed)
    if rng.random() < 0.5:
        models.reverse()
    refusal = ""
    for _ in range(_TRIES):
        item = await asyncio.to_thread(sample_item, registry, dataset, rng, prompt_type)
        req = DecomposeRequest(
            image=item.image, prompts=[item.prompt], kind=item.kind, seed=rng.randrange(2**31)
        )
        try:
            results = await asyncio.gather(*(run(req, item.prompt, m) for m in models))
        except ApiError as e:
            if e.code != "refused":
                raise
            refusal = e.message
            continue
        layers = [base64.b64encode(encode_png(r["layer"])).decode() for r in results]
        return {
            "dataset": item.dataset,
            "split": item.split,
            "item": item.item,
            "sample_id": item.sample_id,
            "prompt_type": item.prompt_type,
            "kind": item.kind,
            "prompt": prompt_for_page(item.prompt),
            "description": describe_prompt(item.prompt, item.kind),
            "seed": req.seed,
            "steps": steps,
            "width": int(item.image.shape[1]),
            "height": int(item.image.shape[0]),
            "image_png": base64.b64encode(encode_png(item.image)).decode(),
            "a": {"model": models[0], "layer_png": layers[0]},
            "b": {"model": models[1], "layer_png": layers[1]},
        }
    raise ApiError(
        422,
        "refused",
        f"{_TRIES} sampled prompts were refused by {models[0]} or {models[1]} (last: {refusal}); "
        "ask for a prompt type both take (prompt_type=box)",
    )


def _param(query: Mapping[str, str], name: str) -> str:
    value = (query.get(name) or "").strip()
    if not value:
        raise ApiError(422, "missing_field", f"parameter {name!r} is required")
    if len(value) > _MAX_PARAM or not value.isprintable():
        raise ApiError(
            422, "invalid_field", f"parameter {name!r} is not a registry reference: {value[:60]!r}"
        )
    return value


# ---------------------------------------------------------------------------------------------- votes
async def read_vote_body(request) -> bytes:
    """The raw body of a ``POST /v1/votes`` request, read no further than :data:`MAX_VOTE_BYTES`.

    Raises:
        ApiError: 415 ``unsupported_media_type`` unless JSON, 413 ``too_large``.
    """
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("application/json"):
        raise ApiError(
            415, "unsupported_media_type", f"Content-Type {ctype[:60] or '(none)'}: send application/json"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_VOTE_BYTES:
        raise ApiError(413, "too_large", f"a vote of {int(declared)} bytes; at most {MAX_VOTE_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_VOTE_BYTES:
            raise ApiError(413, "too_large", f"a vote of more than {MAX_VOTE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_vote(raw: bytes) -> tuple[str, Vote]:
    """A ``POST /v1/votes`` body -> (votes name, the vote), by the ELO module's rules (:func:`parse_votes`).

    Raises:
        ApiError: 413 ``too_large``, 400 ``invalid_json``, 422 ``unknown_field`` / ``missing_field`` /
            ``invalid_field``, 422 ``invalid_name`` (not a registry name), 422 ``invalid_vote`` (an unknown winner,
            twice the same model, an empty field).
    """
    from reflade.platform.registry import RegistryError, validate_name

    if len(raw) > MAX_VOTE_BYTES:
        raise ApiError(413, "too_large", f"a vote of {len(raw)} bytes; at most {MAX_VOTE_BYTES}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_field", f"a vote is a JSON object with {', '.join(VOTE_FIELDS)}")
    unknown = sorted(str(k) for k in body if k not in VOTE_FIELDS)
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown fields {unknown} (known: {', '.join(VOTE_FIELDS)})")
    missing = [k for k in VOTE_FIELDS if k not in body]
    if missing:
        raise ApiError(
            422, "missing_field", f"missing {', '.join(missing)} (a vote has {', '.join(VOTE_FIELDS)})"
        )
    long = [k for k in VOTE_FIELDS if isinstance(body[k], str) and len(body[k]) > _MAX_FIELD]
    if long:
        raise ApiError(422, "invalid_field", f"{', '.join(long)} longer than {_MAX_FIELD} characters")
    name = body["name"]
    try:
        validate_name(name, "votes name")
    except RegistryError as e:
        raise ApiError(422, "invalid_name", str(e)) from None
    if body["winner"] not in WINNERS:  # the page sends a, b or tie; a model name is for files, not this API
        raise ApiError(
            422, "invalid_vote", f"winner {str(body['winner'])[:40]!r}: one of {', '.join(WINNERS)}"
        )
    source = "the vote"
    try:
        (vote,) = parse_votes([json.dumps({k: body[k] for k in VOTE_FIELDS[1:]})], source)
    except VoteError as e:
        raise ApiError(422, "invalid_vote", str(e).replace(f"{source} line 1: ", "", 1)) from None
    return name, vote


class VoteBook:
    """Appends votes to ``votes/NAME`` versions, one at a time (an ``asyncio.Lock`` per ingress replica); keeps
    the last version's votes it wrote, so a vote costs one listing and one upload when nobody else wrote between."""

    def __init__(self, registry):
        self.registry = registry
        self.lock = asyncio.Lock()
        self.known: dict[str, tuple[int, list[Vote]]] = {}

    async def record(self, name: str, vote: Vote) -> dict[str, Any]:
        """Append ``vote`` to ``votes/NAME``: ``{"ref", "version", "n_votes"}`` of the new version.

        Raises:
            ApiError: 409 ``unreadable_votes`` when the latest version cannot be read as votes.
        """
        async with self.lock:
            version, votes = await asyncio.to_thread(self._append, name, vote)
        return {"ref": version.ref, "version": version.version, "n_votes": len(votes)}

    def _append(self, name: str, vote: Vote):
        latest = self.registry.latest_version(VOTES_KIND, name)
        if latest is None:
            votes: list[Vote] = []
        elif self.known.get(name, (None,))[0] == latest:
            votes = self.known[name][1]
        else:
            try:
                votes = read_votes(f"{VOTES_KIND}/{name}@{latest}", self.registry)
            except VoteError as e:
                raise ApiError(409, "unreadable_votes", str(e)) from None
        votes = [*votes, vote]
        version = register_votes(self.registry, name, votes)
        self.known[name] = (version.version, votes)
        return version, votes
