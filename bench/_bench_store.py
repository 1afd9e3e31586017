"""The world of the storage benchmarks (``registry.py``, ``engine_commit.py``, ``shard_verify.py``): an object store of
their own, and the dataset rows they put in it.

``object_store()`` starts a SeaweedFS (``weed mini``) with generated credentials on free ports in a temporary folder
and removes both afterwards; ``noise_row`` builds one dataset row (one layer) of incompressible noise with the
product's row builder, so a shard's bytes are the worst case for hashing and copying.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reflade.engine.schema import build_row, encode_png, make_sample_id
from reflade.platform.config import StorageConfig
from reflade.platform.stack import SeaweedServer, find_free_base_port, generate_credentials
from reflade.platform.storage import Storage

BUCKET = "reflade-bench"


@dataclass
class OwnStore:
    """A running object store: ``work`` (its temporary folder; put scratch files here), ``config`` (endpoint, bucket,
    credentials), ``storage`` (a client of it) and ``startup_s`` (seconds to start it and create the bucket)."""

    work: Path
    config: StorageConfig
    storage: Storage
    startup_s: float


@contextmanager
def object_store() -> Iterator[OwnStore]:
    """A SeaweedFS of this process's own, bucket :data:`BUCKET` created; stopped and its folder removed on exit."""
    work = Path(tempfile.mkdtemp(prefix="reflade-bench-"))
    server = SeaweedServer(work / "data", generate_credentials(), s3_port=find_free_base_port())
    try:
        t0 = time.perf_counter()
        server.start(timeout=60)
        server.create_bucket(BUCKET)
        startup_s = time.perf_counter() - t0
        config = StorageConfig(
            endpoint=server.endpoint,
            bucket=BUCKET,
            access_key_id=server.credentials.access_key_id,
            secret_access_key=server.credentials.secret_access_key,
        )
        yield OwnStore(work=work, config=config, storage=Storage(config), startup_s=startup_s)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def noise_row(rng: np.random.Generator, sha: str, config_hash: str, side: int) -> dict:
    """One row of source ``sha`` (its ``source_id`` is ``sha[:16]``): a ``side`` x ``side`` noise image and a noise
    layer (PNGs of uniform noise: about 7 * side**2 bytes together, incompressible), a random visible mask and one
    box prompt over the whole image. The writers accept it (they validate rows without decoding them); decoded, the
    noise layer is not straight alpha."""
    return build_row(
        sample_id=make_sample_id(sha, 0, "foreground", config_hash),
        source_id=sha[:16],
        source_sha256=sha,
        image_png=encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)),
        width=side,
        height=side,
        layer=rng.integers(0, 256, (side, side, 4), dtype=np.uint8),
        visible_mask=rng.random((side, side)) > 0.5,
        kind="foreground",
        category="noise",
        prompts=[
            {
                "type": "box",
                "granularity": "coarse",
                "points": [],
                "box": [0, 0, side, side],
                "mask": None,
                "text": None,
            }
        ],
        split="train",
        scores={},
        config_hash=config_hash,
        backends={},
        weights=[],
    )
