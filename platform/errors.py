"""The one base class the CLI reports as a message, not a traceback.

Every package's errors that describe bad input or a state a person can fix (an engine run that kept no layer, a
dataset of an unknown schema version, a malformed prompt, a refused checkpoint) derive from :class:`ReportedError`
as well as from their built-in base, so ``reflade`` and every job print ``error: Name: message`` and exit 1
without ``platform`` importing the other packages. Errors from bugs stay plain exceptions, with their traceback.
"""

from __future__ import annotations


class ReportedError(Exception):
    """An error whose message says what is wrong and what to do: shown to a person without a traceback."""
