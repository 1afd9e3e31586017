"""ELO ratings from human pairwise votes, and HPA bounds fitted to them (rld-method.md, "Human alignment").

A vote is one JSON object per line (JSONL)::

    {"item": "img-0007", "prompt": "text+box", "model_a": "reflayer", "model_b": "mulan", "winner": "a"}

``winner`` is ``"a"``, ``"b"``, ``"tie"`` or the name of ``model_a`` / ``model_b``. Votes live in local ``.jsonl``
files (or a folder of them) or in the registry under kind ``votes`` (``votes/NAME[@VERSION|@ALIAS]``).

Ratings are a Bradley-Terry maximum-a-posteriori fit on the Elo scale, not sequential online Elo: the result does not
depend on the order of the votes, and a weak Gaussian prior keeps a model that never lost finite. Intervals come from
a bootstrap over votes. :func:`fit_bounds` re-fits the worst ends of one layer kind's HPA bounds so that HPA follows
the ratings as closely as possible (Pearson over models), keeping the best ends at the ideal values.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import minimize
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import expit, log_expit

from reflade.platform.errors import ReportedError

if TYPE_CHECKING:  # the registry (and boto3 with it) is imported only where votes go to or come from it
    from reflade.platform.registry import Registry, Version

VOTES_KIND = "votes"
WINNERS = ("a", "b", "tie")
_VOTE_KEYS = ("item", "prompt", "model_a", "model_b", "winner")
_LN10 = math.log(10.0)


class EloError(ReportedError, ValueError):
    """Ratings or a bounds fit cannot be computed from what was given (the message says what is missing)."""


class VoteError(EloError):
    """Votes are malformed or too few to rate the models (the message names the source and line, or the models)."""


# ---------------------------------------------------------------------------------------------------- votes
@dataclass(frozen=True)
class Vote:
    """One human judgement between the outputs of two models on the same item and prompt."""

    item: str
    """The test item (image) both outputs were made for."""
    prompt: str
    """Prompt type or description (e.g. ``text+box``)."""
    model_a: str
    """Model shown as A."""
    model_b: str
    """Model shown as B (never equal to ``model_a``)."""
    winner: str
    """``"a"``, ``"b"`` or ``"tie"``."""

    @property
    def score_a(self) -> float:
        """A's score: 1 for a win, 0.5 for a tie, 0 for a loss."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.winner]

    def to_dict(self) -> dict[str, str]:
        """The JSON object of one JSONL line."""
        return {k: getattr(self, k) for k in _VOTE_KEYS}


def parse_votes(lines: Iterable[str], source: str) -> list[Vote]:
    """Parse JSONL votes; blank lines are skipped, extra keys ignored.

    Args:
        lines: the lines of one JSONL file (with or without line ends).
        source: what the lines came from (a path or ``votes/NAME@N/file``), for error messages.

    Raises:
        VoteError: ``SOURCE line N: ...`` for bad JSON, a non-object, a missing or non-string key, an unknown
            winner, or ``model_a == model_b``.
    """
    votes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise VoteError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise VoteError(f"{where}: expected a JSON object with keys {', '.join(_VOTE_KEYS)}")
        missing = [k for k in _VOTE_KEYS if k not in obj]
        if missing:
            raise VoteError(
                f"{where}: missing key(s) {', '.join(missing)} (a vote has {', '.join(_VOTE_KEYS)})"
            )
        not_str = [k for k in _VOTE_KEYS if not isinstance(obj[k], str) or not obj[k]]
        if not_str:
            raise VoteError(f"{where}: {', '.join(not_str)} must be non-empty string(s)")
        a, b, winner = obj["model_a"], obj["model_b"], obj["winner"]
        if a == b:
            raise VoteError(
                f"{where}: model_a and model_b are both {a!r}; a vote compares two different models"
            )
        # The keywords win over model names, so a model called "a" or "tie" cannot make a vote ambiguous.
        if winner not in WINNERS:
            if winner == a:
                winner = "a"
            elif winner == b:
                winner = "b"
            else:
                raise VoteError(f"{where}: unknown winner {winner!r} (expected a, b, tie, {a!r} or {b!r})")
        votes.append(Vote(item=obj["item"], prompt=obj["prompt"], model_a=a, model_b=b, winner=winner))
    return votes


def is_votes_ref(path_or_ref: str | os.PathLike) -> bool:
    """True when the argument is a registry reference of kind ``votes`` (it starts with ``votes/``)."""
    return isinstance(path_or_ref, str) and path_or_ref.startswith(f"{VOTES_KIND}/")


def read_votes(path_or_ref: str | os.PathLike, registry: Registry | None = None) -> list[Vote]:
    """All votes of a local ``.jsonl`` file, a folder of them (not recursive), or a ``votes/...`` reference.

    Args:
        path_or_ref: a path, or ``votes/NAME[@VERSION|@ALIAS]`` (every ``*.jsonl`` file of the version is read).
        registry: used for a reference (default: the one of the current configuration).

    Raises:
        VoteError: a malformed line (see :func:`parse_votes`), a missing path, a folder or version without
            ``.jsonl`` files, or no votes at all.
        RegistryError: an unknown reference (the message lists what exists).
    """
    if is_votes_ref(path_or_ref):
        registry = registry if registry is not None else _default_registry()
        version = registry.resolve(str(path_or_ref))
        names = sorted(f["path"] for f in version.files if f["path"].endswith(".jsonl"))
        if not names:
            have = ", ".join(f["path"] for f in version.files[:10])
            raise VoteError(f"{version.ref} has no .jsonl files (files: {have})")
        votes = []
        for name in names:
            text = registry.read_bytes(version, name).decode("utf-8")
            votes += parse_votes(text.splitlines(), f"{version.ref}/{name}")
        where = version.ref
    else:
        path = Path(path_or_ref)
        if path.is_dir():
            files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
            if not files:
                raise VoteError(f"{path}: folder has no *.jsonl files")
        elif path.is_file():
            files = [path]
        else:
            raise VoteError(
                f"{path}: no such file or folder (give a .jsonl file, a folder or votes/NAME@VERSION)"
            )
        votes = []
        for file in files:
            with open(file, encoding="utf-8") as f:
                votes += parse_votes(f, str(file))
        where = str(path)
    if not votes:
        raise VoteError(f"{where}: no votes (every line was blank)")
    return votes


def register_votes(
    registry: Registry, name: str, votes_or_path: Sequence[Vote] | str | os.PathLike
) -> Version:
    """Register votes as a new version of ``votes/NAME`` (one ``votes.jsonl``; identical votes reuse a version).

    Args:
        votes_or_path: votes, or anything :func:`read_votes` reads (checked line by line before the upload).

    Returns:
        The version; its metadata has ``n_votes`` and ``models`` (sorted).

    Raises:
        VoteError: no votes, or a malformed line of the source.
        RegistryError: a bad name.
    """
    if isinstance(votes_or_path, (str, os.PathLike)):
        votes = read_votes(votes_or_path, registry)
    else:
        votes = list(votes_or_path)
    if not votes:
        raise VoteError(f"votes/{name}: nothing to register (no votes)")
    models = sorted({m for v in votes for m in (v.model_a, v.model_b)})
    with tempfile.TemporaryDirectory(prefix="reflade-votes-") as tmp:
        file = Path(tmp) / "votes.jsonl"
        file.write_text("".join(json.dumps(v.to_dict()) + "\n" for v in votes), encoding="utf-8")
        return registry.create(
            VOTES_KIND,
            name,
            files={"votes.jsonl": file},
            metadata={"n_votes": len(votes), "models": models},
        )


def _default_registry() -> Registry:
    from reflade.platform.config import load_config
    from reflade.platform.registry import Registry

    return Registry.from_config(load_config())


# ---------------------------------------------------------------------------------------------------- ratings
@dataclass(frozen=True)
class EloRating:
    """One model's rating with its bootstrap interval."""

    model: str
    rating: float
    """Elo points, fitted on all votes."""
    low: float
    """Lower end of the bootstrap percentile interval (Elo points)."""
    high: float
    """Upper end of the bootstrap percentile interval (Elo points)."""
    n_votes: int
    """Votes the model took part in."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "model": self.model,
            "rating": self.rating,
            "low": self.low,
            "high": self.high,
            "n_votes": self.n_votes,
        }


@dataclass(frozen=True)
class _Tally:
    """Votes reduced to integer model indices (one row per vote), the form the fit and the bootstrap use."""

    models: list[str]
    a: np.ndarray
    b: np.ndarray
    score_a: np.ndarray


def _tally(votes: Sequence[Vote]) -> _Tally:
    if not votes:
        raise VoteError("no votes to rate models with")
    models = sorted({m for v in votes for m in (v.model_a, v.model_b)})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[v.model_a] for v in votes], dtype=np.int64)
    b = np.array([index[v.model_b] for v in votes], dtype=np.int64)
    score = np.array([v.score_a for v in votes], dtype=np.float64)
    return _Tally(models, a, b, score)


def _pairs(
    t: _Tally, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per unordered pair i < j: (i, j, number of games, i's total score), weighted by bootstrap counts."""
    n = len(t.models)
    w = np.ones(len(t.a)) if weights is None else weights
    lo, hi = np.minimum(t.a, t.b), np.maximum(t.a, t.b)
    score_lo = np.where(t.a == lo, t.score_a, 1.0 - t.score_a)
    key = lo * n + hi
    games = np.bincount(key, weights=w, minlength=n * n)
    scores = np.bincount(key, weights=w * score_lo, minlength=n * n)
    keep = np.flatnonzero(games > 0)
    return keep // n, keep % n, games[keep], scores[keep]


def _components(n: int, src: np.ndarray, dst: np.ndarray, *, strong: bool = False) -> np.ndarray:
    """Component label of each model in the comparison graph: undirected, or strongly connected along src -> dst."""
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=strong, connection="strong")[1]


def _groups(models: list[str], labels: np.ndarray) -> str:
    groups = [sorted(m for m, lab in zip(models, labels, strict=True) if lab == g) for g in np.unique(labels)]
    return "; ".join("{" + ", ".join(g) + "}" for g in groups)


def _check_connected(models: list[str], i: np.ndarray, j: np.ndarray) -> None:
    labels = _components(len(models), i, j)
    if labels.max(initial=0) > 0:
        raise VoteError(
            f"the models fall into groups never compared with each other, so their ratings are not comparable: "
            f"{_groups(models, labels)}; add votes between the groups or rate each group on its own"
        )


def _fit_theta(
    n: int, i: np.ndarray, j: np.ndarray, games: np.ndarray, scores: np.ndarray, prior_sd: float | None
) -> np.ndarray:
    """Bradley-Terry MAP strengths in natural-log odds units, mean 0."""
    precision = 0.0 if prior_sd is None else 1.0 / prior_sd**2
    losses = games - scores

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[i] - theta[j]
        nll = -(scores @ log_expit(d) + losses @ log_expit(-d))
        g_d = games * expit(d) - scores  # d(nll)/d(d)
        grad = np.bincount(i, g_d, n) - np.bincount(j, g_d, n)
        total = theta.sum()
        # Without a prior only differences are identified; 0.5 * (sum theta)^2 pins the mean at 0 without moving them.
        nll += 0.5 * precision * (theta @ theta) + (0.5 * total**2 if precision == 0.0 else 0.0)
        grad += precision * theta + (total if precision == 0.0 else 0.0)
        return float(nll), grad

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = expit(theta[i] - theta[j])
        h = games * p * (1.0 - p)
        out = np.zeros((n, n))
        np.add.at(out, (i, j), -h)
        np.add.at(out, (j, i), -h)
        out[np.diag_indices(n)] = -out.sum(axis=1)
        out[np.diag_indices(n)] += precision
        return out + (1.0 if precision == 0.0 else 0.0)

    result = minimize(
        objective, np.zeros(n), jac=True, hess=hessian, method="trust-exact", options={"gtol": 1e-9}
    )
    theta = result.x - result.x.mean()
    if not np.all(np.isfinite(theta)):
        raise VoteError("the rating fit did not converge (non-finite ratings); give a finite prior")
    return theta


def _fit(t: _Tally, weights: np.ndarray | None, base: float, scale: float, prior: float | None) -> np.ndarray:
    n = len(t.models)
    i, j, games, scores = _pairs(t, weights)
    prior_sd = None if prior is None else prior * _LN10 / scale
    return base + _fit_theta(n, i, j, games, scores, prior_sd) * scale / _LN10


def fit_elo(
    votes: Sequence[Vote], *, base: float = 1000.0, scale: float = 400.0, prior: float | None = 400.0
) -> dict[str, float]:
    """Bradley-Terry ratings of every model in the votes, on the Elo scale, mean ``base``.

    ``P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / scale))``; a tie counts half a win for each side. The ratings
    maximise the likelihood of all votes at once (plus the prior), so they do not depend on the order of the votes,
    unlike online Elo. The negative log-posterior is smooth and convex; it is minimised by
    ``scipy.optimize.minimize(method="trust-exact")`` with its exact gradient and Hessian (Newton steps inside a
    trust region: a handful of iterations, also when a rating is far from the start), on the votes summed per pair.

    Args:
        votes: the votes; every model in them gets a rating.
        base: mean rating (Elo points).
        scale: Elo points per factor 10 in the odds (400 as in chess).
        prior: standard deviation (Elo points) of a Gaussian prior on each rating around ``base``. It keeps the
            rating of a model that never lost (or never won) finite; the default weighs about as much as one vote.
            ``None`` gives the plain maximum likelihood, which exists only when every model has both beaten and
            lost to (or tied with) someone along a cycle of comparisons.

    Raises:
        VoteError: no votes; models in groups never compared with each other (the groups are named); with
            ``prior=None``, ratings that are not finite (the groups that only won or only lost are named).
    """
    if prior is not None and not (prior > 0 and math.isfinite(prior)):
        raise ValueError(f"fit_elo: prior must be a positive number of Elo points or None, got {prior}")
    t = _tally(votes)
    i, j, _, _ = _pairs(t)
    _check_connected(t.models, i, j)
    if prior is None:
        # A directed edge loser -> winner per vote (both ways for a tie): the MLE is finite iff strongly connected.
        lost, won = t.score_a < 1, t.score_a > 0
        src = np.concatenate([t.a[lost], t.b[won]])
        dst = np.concatenate([t.b[lost], t.a[won]])
        labels = _components(len(t.models), src, dst, strong=True)
        if labels.max(initial=0) > 0:
            raise VoteError(
                f"without a prior the ratings are infinite: some groups only won (or only lost) against the others: "
                f"{_groups(t.models, labels)}; give a prior (e.g. prior=400)"
            )
    ratings = _fit(t, None, base, scale, prior)
    return dict(zip(t.models, ratings.tolist(), strict=True))


def elo_with_ci(
    votes: Sequence[Vote],
    *,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    base: float = 1000.0,
    scale: float = 400.0,
    prior: float | None = 400.0,
) -> dict[str, EloRating]:
    """Ratings (:func:`fit_elo`) with bootstrap percentile intervals, keyed and ordered by model name.

    Each replicate resamples the votes with replacement and refits. A replicate whose comparison graph falls
    apart (a model drawn in no vote, or groups never compared) cannot place every model on one scale; it is
    drawn again, which matters only for very sparse votes.

    Args:
        n_bootstrap: number of replicates.
        confidence: coverage of the interval, in (0, 1).
        seed: random seed of the resampling (same seed, same intervals).
        base, scale, prior: as in :func:`fit_elo`.

    Raises:
        VoteError: as :func:`fit_elo`; or the votes are so sparse that most resamples are disconnected.
        ValueError: ``n_bootstrap < 1`` or ``confidence`` outside (0, 1).
    """
    if n_bootstrap < 1:
        raise ValueError(f"elo_with_ci: n_bootstrap must be at least 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"elo_with_ci: confidence must be in (0, 1), got {confidence}")
    point = fit_elo(votes, base=base, scale=scale, prior=prior)
    t = _tally(votes)
    n_models, n_votes = len(t.models), len(t.a)
    rng = np.random.default_rng(seed)
    replicates, tries = [], 0
    while len(replicates) < n_bootstrap:
        tries += 1
        if tries > 10 * n_bootstrap:
            raise VoteError(
                f"too few votes for a bootstrap: {tries - len(replicates)} of {tries} resamples left some models "
                f"uncompared ({n_votes} votes, {n_models} models)"
            )
        counts = rng.multinomial(n_votes, np.full(n_votes, 1.0 / n_votes)).astype(np.float64)
        i, j, _, _ = _pairs(t, counts)
        if (
            len(np.unique(np.concatenate([i, j]))) < n_models
            or _components(n_models, i, j).max(initial=0) > 0
        ):
            continue
        replicates.append(_fit(t, counts, base, scale, prior))
    samples = np.stack(replicates)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    played = np.bincount(t.a, minlength=n_models) + np.bincount(t.b, minlength=n_models)
    return {
        m: EloRating(model=m, rating=point[m], low=float(low[k]), high=float(high[k]), n_votes=int(played[k]))
        for k, m in enumerate(t.models)
    }


__all__ = [
    "VOTES_KIND",
    "EloError",
    "EloRating",
    "Vote",
    "VoteError",
    "elo_with_ci",
    "fit_elo",
    "is_votes_ref",
    "parse_votes",
    "read_votes",
    "register_votes",
]
