"""Bearer API tokens: only their hashes are configured, a request's token is checked in constant time.

A token is ``rl_`` + 43 URL-safe characters (256 random bits), shown once when created; configuration keeps
``sha256:<hex>`` of it. A SHA-256 without salt or stretching is enough here because the tokens are random, not
chosen by people: there is nothing to guess from a leaked hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

from reflade.serve.errors import ApiError

__all__ = ["TOKEN_PREFIX", "TokenChecker", "hash_token", "new_token"]

TOKEN_PREFIX = "rl_"
"""Every token starts with this, so a leaked one is easy to recognise (and to scan for)."""

_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="reflade"'}


def new_token() -> tuple[str, str]:
    """A fresh API token and its hash: ``(token, "sha256:<hex>")``. Show the token once; store only the hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    """``"sha256:<64 hex digits>"`` of a token (its UTF-8 bytes).

    Raises:
        ValueError: the token is not a non-empty string.
    """
    if not isinstance(token, str) or not token:
        raise ValueError("a token is a non-empty string")
    return "sha256:" + _digest(token).hex()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenChecker:
    """Checks ``Authorization: Bearer <token>`` headers against configured token hashes.

    Args:
        hashes: ``"sha256:<hex>"`` strings (from :func:`new_token` / :func:`hash_token`); none at all turns the
            check off (:attr:`enabled` False), which the service decides whether to allow.

    Raises:
        ValueError: a configured hash is malformed; the message names its index, never its value.
    """

    def __init__(self, hashes: Iterable[str]):
        if isinstance(hashes, str):
            raise ValueError("token hashes must be a list of 'sha256:<hex>' strings, got one string")
        self._digests: list[bytes] = []
        for i, value in enumerate(hashes):
            found = _HASH.fullmatch(value.strip().lower()) if isinstance(value, str) else None
            if found is None:
                raise ValueError(
                    f"token hash #{i} is malformed: expected 'sha256:' followed by 64 hex digits "
                    "(create one with `reflade serve token create`)"
                )
            self._digests.append(bytes.fromhex(found.group(1)))

    @property
    def enabled(self) -> bool:
        """True when at least one token hash is configured."""
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Allow the request, or refuse it.

        Args:
            authorization: the ``Authorization`` header's value, None when absent.

        Raises:
            ApiError: 401 ``missing_token`` (with a ``WWW-Authenticate`` header) when there is no bearer token,
                403 ``invalid_token`` when it matches no configured hash. Nothing when the check is off.
        """
        if not self._digests:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "missing_token",
                "this endpoint needs an API token: send the header 'Authorization: Bearer <token>' "
                "(WWW-Authenticate: Bearer)",
                headers=_CHALLENGE,
            )
        digest = _digest(token)
        # Compare with every hash, no early exit: the time taken says nothing about which one (if any) matched.
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        if not matched:
            raise ApiError(403, "invalid_token", "the API token is not valid (it may have been revoked)")
