"""Page tokens: a token is only good for the query that made it, under the key that signed it, holding
the cursor shape its caller expects; everything else is INVALID_ARGUMENT / INVALID_PAGE_TOKEN."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kit import paging
from services.kit.paging import decode_token, encode_token
from tuneforge_core.errors import FieldViolation, InvalidArgument
from tuneforge_core.reasons import Reason
from tuneforge_core.settings import KitSettings

QUERY = {"org": "acme", "states": [1, 2]}
KEY = "k" * 32


@pytest.fixture(autouse=True)
def fixed_key() -> Iterator[None]:
    saved = list(paging._keys)
    paging.configure(KEY)
    yield
    paging._keys[:] = saved


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def assert_rejected(token: str, query: Any = QUERY, **kwargs: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_token(token, query, **kwargs)
    err = info.value
    assert err.reason == Reason.INVALID_PAGE_TOKEN
    assert [v.field for v in err.violations] == ["page_token"]
    assert isinstance(err.violations[0], FieldViolation)


def test_round_trip_of_each_cursor_shape() -> None:
    assert decode_token(encode_token("job_01", QUERY), QUERY, cursor_type=str) == "job_01"
    assert decode_token(encode_token([7, 1], QUERY), QUERY, cursor_type=tuple[int, int]) == (7, 1)
    when = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    token = encode_token((when, "ds_1"), QUERY)
    assert decode_token(token, QUERY, cursor_type=tuple[datetime, str]) == (when, "ds_1")
    # Without a type the JSON comes back as it is (the old call signature still works).
    assert decode_token(encode_token(["a", "b"], QUERY), QUERY) == ["a", "b"]


def test_empty_token_is_the_first_page() -> None:
    assert decode_token("", QUERY, cursor_type=str) is None


def test_token_is_url_safe_and_short() -> None:
    token = encode_token("job_01HZX3", QUERY)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert len(token) < 80


def unsigned(cursor: Any) -> str:
    """What the old tokens were: base64 JSON with no signature."""
    return b64(json.dumps({"c": cursor, "q": "0" * 12}).encode())


JOB_01 = b64(b'"job_01"')
FORGED = {
    "json object": b64(b'{"x":1}'),
    "json list": b64(b"[1,2]"),
    "old unsigned token": unsigned("job_01"),
    "payload only": JOB_01,
    "mac of zeros": f"{JOB_01}.{b64(bytes(32))}",
    "three parts": "a.b.c",
    "just a dot": ".",
    "not base64": "!!!.???",
    "non ascii": "é.ü",
    "padding inside": "ab==.cd",
    "whitespace": " " + "A" * 10 + ".B",
    "huge": "A" * 10_000 + "." + "B" * 43,
    "nul": "\x00",
}


@pytest.mark.parametrize("token", FORGED.values(), ids=FORGED.keys())
def test_forged_tokens_are_rejected(token: str) -> None:
    assert_rejected(token)
    assert_rejected(token, cursor_type=str)


def test_every_truncation_of_a_real_token_is_rejected() -> None:
    token = encode_token("job_01HZX3", QUERY)
    for end in range(1, len(token)):
        assert_rejected(token[:end], cursor_type=str)


def test_every_single_character_edit_is_rejected() -> None:
    token = encode_token("job_01", QUERY)
    for i, char in enumerate(token):
        for other in {"A", "B", "-", "_", "."} - {char}:
            assert_rejected(token[:i] + other + token[i + 1:], cursor_type=str)


def test_non_canonical_base64_spelling_is_rejected() -> None:
    payload, mac = encode_token("job_01", QUERY).split(".")
    # The last base64 character of an unpadded 32-byte mac carries 2 unused bits: flip one of them.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = mac[:-1] + alphabet[alphabet.index(mac[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(mac + "=")
    assert_rejected(f"{payload}.{twin}", cursor_type=str)


def test_token_of_another_query_is_rejected() -> None:
    token = encode_token("job_01", QUERY)
    assert_rejected(token, {"org": "other", "states": [1, 2]}, cursor_type=str)
    assert_rejected(token, {"org": "acme", "states": [1]}, cursor_type=str)


def resign(cursor_json: bytes, key: bytes, query: Any = QUERY) -> str:
    return f"{b64(cursor_json)}.{b64(paging._mac(key, query, cursor_json))}"


def test_token_signed_with_another_key_is_rejected() -> None:
    assert_rejected(resign(b'"job_01"', b"another key, 32 bytes long......"), cursor_type=str)
    # ... and a plain SHA-256 or an HMAC without the version tag are not the signature either.
    assert_rejected(f"{b64(b'1')}.{b64(hashlib.sha256(b'1').digest())}")
    assert_rejected(f"{b64(b'1')}.{b64(hmac.new(KEY.encode(), b'1', hashlib.sha256).digest())}")


@pytest.mark.parametrize("cursor_json, cursor_type", [
    (b'{"x":1}', str),
    (b"[1,2]", str),
    (b"1", str),
    (b"null", str),
    (b"null", Any),
    (b'"x"', tuple[int, int]),
    (b"[1]", tuple[int, int]),
    (b"[1,2,3]", tuple[int, int]),
    (b'["1",2]', tuple[int, int]),
    (b"[true,2]", tuple[int, int]),
    (b"[1.5,2]", tuple[int, int]),
    (b'["not a time","x"]', tuple[datetime, str]),
    (b'"\\ud800"', str),
    (b"not json", Any),
])
def test_signed_cursor_of_the_wrong_shape_is_rejected(cursor_json: bytes, cursor_type: Any) -> None:
    """A token with a valid signature but a cursor the caller cannot use (a key leaked, or a caller
    changed its cursor shape between releases) never reaches SQL."""
    assert_rejected(resign(cursor_json, KEY.encode()), cursor_type=cursor_type)


def test_key_rotation_first_signs_any_verifies() -> None:
    old = encode_token("job_01", QUERY)
    paging.configure(f"{'n' * 32},{KEY}")
    assert decode_token(old, QUERY, cursor_type=str) == "job_01"
    new = encode_token("job_02", QUERY)
    paging.configure(KEY)
    assert_rejected(new, cursor_type=str)


@pytest.mark.parametrize("bad", ["", " , ", "short"])
def test_configured_key_must_be_long_enough(bad: str) -> None:
    with pytest.raises(ValueError, match="TUNEFORGE_PAGE_TOKEN_KEY"):
        paging.configure(bad)


def test_settings_key_wins_and_empty_means_a_key_file_kept_private(tmp_path: Path) -> None:
    paging.configure_from_settings(KitSettings(data_dir=tmp_path / "a", page_token_key="s" * 20))
    assert not (tmp_path / "a" / "secrets" / paging.KEY_FILE).exists()
    token = encode_token("x", QUERY)
    assert decode_token(token, QUERY, cursor_type=str) == "x"

    paging.configure_from_settings(KitSettings(data_dir=tmp_path / "b"))
    key_file = tmp_path / "b" / "secrets" / paging.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert_rejected(token, cursor_type=str)  # another key now
    token = encode_token("x", QUERY)
    # A restart (or a second process on the same data dir) reads the same key back.
    paging.configure(KEY)
    paging.configure_from_settings(KitSettings(data_dir=tmp_path / "b"))
    assert decode_token(token, QUERY, cursor_type=str) == "x"
    assert list((tmp_path / "b" / "secrets").iterdir()) == [key_file]  # no temporary file left behind


def test_settings_read_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_PAGE_TOKEN_KEY", "e" * 32)
    settings_ = KitSettings()
    assert settings_.page_token_key == "e" * 32
    assert "e" * 32 not in repr(settings_)


RANDOM_TOKENS = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=120).map(b64),
    st.tuples(st.binary(max_size=60), st.binary(min_size=32, max_size=32)).map(
        lambda parts: f"{b64(parts[0])}.{b64(parts[1])}"),
)


@settings(max_examples=300, deadline=None)
@given(token=RANDOM_TOKENS)
def test_random_tokens_are_rejected(token: str) -> None:
    if token:
        assert_rejected(token, cursor_type=str)
        assert_rejected(token, cursor_type=tuple[int, int])
