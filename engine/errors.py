"""The data engine's own error (its stages quarantine bad inputs instead of raising)."""

from __future__ import annotations

from reflade.platform.errors import ReportedError


class EngineError(ReportedError, RuntimeError):
    """The run cannot go on or its counts do not balance."""
