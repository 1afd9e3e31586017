"""Progress bars for long work (tqdm on stderr)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

# Below this size a transfer finishes before a bar is worth drawing.
_BAR_MIN_BYTES = 8 * 1024 * 1024


def show_progress(progress: bool | None, size: int | None = None) -> bool:
    """True: always; False: never; None: when stderr is a terminal and the work is large."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and (size is None or size >= _BAR_MIN_BYTES)


@contextmanager
def byte_bar(total: int, desc: str, progress: bool | None = None):
    """A bar counting bytes; ``bar.update(n)`` fits boto3's transfer ``Callback``."""
    bar = tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=not show_progress(progress, total),
        file=sys.stderr,
    )
    try:
        yield bar
    finally:
        bar.close()
