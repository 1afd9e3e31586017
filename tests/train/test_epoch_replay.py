"""A Ray Train worker's epochs: the first pass over its shard streams; later ones replay it from memory when it fits
(``TrainSettings.replay_mib``), so that a small dataset does not pay Ray Data's restart at every epoch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reflade.train.config import TrainSettings
from reflade.train.ray_loop import _batch_bytes, _epochs


class Shard:
    """A stand-in for a Ray Train dataset shard: counts how often its data is read."""

    def __init__(self, rows: int, width: int = 16):
        self.rows, self.width, self.reads = rows, width, 0

    def iter_batches(self, batch_size, batch_format):
        assert batch_format == "numpy"
        self.reads += 1
        for start in range(0, self.rows, batch_size):
            idx = np.arange(start, min(start + batch_size, self.rows))
            yield {
                "lat_image": np.repeat(idx[:, None], self.width, axis=1).astype(np.float32),
                "text": np.array([f"row {i}" for i in idx], dtype=object),
            }


def _ids(batches):
    return [b["lat_image"][:, 0].astype(int).tolist() for b in batches]


def test_a_shard_that_fits_is_read_once_and_replayed_in_the_same_order():
    shard = Shard(rows=19)
    settings = TrainSettings(batch_size=4, replay_mib=1.0)
    stats: dict[str, int] = {}
    got = list(
        itertools.islice(_epochs(shard, settings, rank=0, stats=stats), 5 * 3)
    )  # 3 epochs of 5 batches
    assert shard.reads == 1 and stats["shard_reads"] == 1
    first = _ids(got[:5])
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18]]
    assert _ids(got[5:10]) == first and _ids(got[10:]) == first
    assert list(got[7]["text"]) == ["row 8", "row 9", "row 10", "row 11"]


@pytest.mark.parametrize("replay_mib", [0.0, 0.001])
def test_off_or_too_large_reads_the_shard_every_epoch(replay_mib):
    shard = Shard(rows=19, width=64)  # 19 rows x 64 float32 = 4.9 KB > 0.001 MiB (1 KB)
    settings = TrainSettings(batch_size=4, replay_mib=replay_mib)
    got = list(itertools.islice(_epochs(shard, settings, rank=0), 5 * 3 + 1))
    assert shard.reads == 4
    assert _ids(got[:5]) == _ids(got[5:10]) == _ids(got[10:15])


def test_an_empty_shard_is_an_error_naming_the_rank():
    with pytest.raises(RuntimeError, match="rank 3: the train split gave no rows"):
        next(_epochs(Shard(rows=0), TrainSettings(batch_size=4), rank=3))


def test_batch_bytes_counts_object_columns_by_their_items():
    batch = {"a": np.zeros((2, 8), np.float32), "t": np.array(["abc", "de"], dtype=object)}
    assert _batch_bytes(batch) == 2 * 8 * 4 + 5


def test_replay_mib_is_validated():
    with pytest.raises(ValueError, match="replay_mib must be >= 0"):
        TrainSettings(replay_mib=-1)


@pytest.mark.parametrize("others_fit", [True, False])
def test_ranks_replay_only_when_every_rank_fits(others_fit):
    """With several ranks, ``agree`` (a collective in the worker) decides: one rank whose epoch did not fit makes every
    rank stream again, since Ray Data's streaming split starts an epoch only when all ranks ask for it."""
    shard = Shard(rows=8)
    asked: list[bool] = []

    def agree(fits: bool) -> bool:
        asked.append(fits)
        return fits and others_fit

    got = list(itertools.islice(_epochs(shard, TrainSettings(batch_size=4), rank=1, agree=agree), 2 * 3))
    assert _ids(got) == [[0, 1, 2, 3], [4, 5, 6, 7]] * 3
    if others_fit:
        assert shard.reads == 1 and asked == [True]
    else:
        assert shard.reads == 3 and asked == [True, True]  # asked again at the end of each streamed epoch
