"""Entrypoint of every Ray job: ``python -m reflade.platform.jobrunner KIND ARGS...`` runs the ``reflade.jobs``
entry point KIND with ARGS, exactly as the local command would (one code path)."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = {ep.name: ep for ep in entry_points(group="reflade.jobs")}
    if not argv or argv[0] not in kinds:
        given = argv[0] if argv else "(none)"
        print(
            f"error: unknown job kind {given!r} (known: {', '.join(sorted(kinds)) or 'none'})",
            file=sys.stderr,
        )
        return 2
    fn = kinds[argv[0]].load()
    result = fn(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
