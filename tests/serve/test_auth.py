"""serve/auth.py: bearer tokens, only their hashes configured, checked in constant time."""

from __future__ import annotations

import hashlib
import re

import pytest

import reflade.serve.auth as auth_module
from reflade.serve.auth import TokenChecker, hash_token, new_token
from reflade.serve.requests import ApiError


def refused(checker: TokenChecker, header: str | None) -> ApiError:
    with pytest.raises(ApiError) as info:
        checker.check(header)
    return info.value


def test_new_token_and_its_hash():
    token, hashed = new_token()
    assert re.fullmatch(r"rl_[A-Za-z0-9_-]{43}", token)
    assert hashed == hash_token(token) == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert token not in hashed
    assert len({new_token()[0] for _ in range(50)}) == 50
    with pytest.raises(ValueError):
        hash_token("")


def test_several_tokens_pass_others_are_refused():
    (a, ha), (b, hb) = new_token(), new_token()
    checker = TokenChecker([ha, hb])
    assert checker.enabled
    for token in (a, b):
        checker.check(f"Bearer {token}")
        checker.check(f"bearer   {token}  ")  # the scheme is case-insensitive; spaces are tolerated
    for header in (f"Bearer {a}x", f"Bearer {a[:-1]}", "Bearer rl_nope", f"Bearer {ha}"):
        err = refused(checker, header)
        assert (err.status, err.code) == (403, "invalid_token")
        assert a not in err.message and ha not in err.message
    assert TokenChecker([hb]).enabled and refused(TokenChecker([hb]), f"Bearer {a}").status == 403


@pytest.mark.parametrize(
    "header", [None, "", "   ", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "rl_abc", "Token x"]
)
def test_missing_token_is_401_with_a_challenge(header):
    checker = TokenChecker([new_token()[1]])
    err = refused(checker, header)
    assert (err.status, err.code) == (401, "missing_token")
    assert "Authorization: Bearer" in err.message and "WWW-Authenticate" in err.message
    assert err.headers["WWW-Authenticate"].startswith("Bearer")
    assert err.to_json()["error"]["code"] == "missing_token"


def test_no_hashes_means_the_check_is_off():
    checker = TokenChecker([])
    assert not checker.enabled
    checker.check(None)
    checker.check("Bearer anything")


def test_every_hash_is_compared_even_after_a_match(monkeypatch):
    tokens = [new_token() for _ in range(4)]
    checker = TokenChecker([h for _, h in tokens])
    calls = []
    real = auth_module.hmac.compare_digest

    def counting(x, y):
        calls.append(1)
        return real(x, y)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    checker.check(f"Bearer {tokens[0][0]}")  # matches the first
    assert len(calls) == 4
    calls.clear()
    refused(checker, "Bearer wrong")
    assert len(calls) == 4


def test_malformed_configuration_names_the_index_not_the_value():
    good = new_token()[1]
    secret_looking = "sha256:" + "ab" * 31  # 62 hex digits: one byte short
    for hashes, index in (
        ([secret_looking], 0),
        ([good, "md5:" + "0" * 32], 1),
        ([good, good, "rl_plaintexttoken"], 2),
        ([good, None], 1),
        (["sha256:" + "g" * 64], 0),
    ):
        with pytest.raises(ValueError) as info:
            TokenChecker(hashes)
        message = str(info.value)
        assert f"#{index}" in message
        for value in hashes:
            if isinstance(value, str) and value != good:
                assert value not in message
    with pytest.raises(ValueError, match="one string"):
        TokenChecker(good)
    # Upper-case hex and stray spaces (a hand-edited YAML file) are fine.
    token, hashed = new_token()
    TokenChecker([" " + hashed.upper().replace("SHA256", "sha256") + " "]).check(f"Bearer {token}")
