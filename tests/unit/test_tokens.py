"""Position tokens, their parser, and the read-your-writes settings (no server)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replica_router import ConfigurationError, ReplicaRouter, RouterSettings
from replica_router._consistency import TokenCodec, _cookie_value, format_lsn, parse_lsn

URL = "postgresql://app:secret@127.0.0.1:1/app"
KEY = b"sixteen bytes or more, please"
LSNS = st.integers(min_value=1, max_value=2**64 - 1)


@given(LSNS)
def test_positions_round_trip_in_postgres_text(lsn: int) -> None:
    text = format_lsn(lsn)
    assert parse_lsn(text) == lsn
    assert text == text.upper()


def test_postgres_examples() -> None:
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert parse_lsn("0/3000060") == 0x3000060
    assert parse_lsn("16/b374d848") == 0x16_B374D848


@given(st.text(max_size=200))
def test_decoding_any_text_never_raises(text: str) -> None:
    for codec in (TokenCodec(None), TokenCodec(KEY)):
        lsn = codec.decode(text)
        assert lsn is None or 0 < lsn < 2**64


@given(st.text(alphabet=string.hexdigits + "/.", max_size=40))
def test_decoding_near_misses_never_raises(text: str) -> None:
    lsn = TokenCodec(None).decode(text)
    assert lsn is None or parse_lsn(text.partition(".")[0]) == lsn


@given(LSNS)
def test_signed_tokens_round_trip_and_only_with_their_key(lsn: int) -> None:
    token = TokenCodec(KEY).encode(lsn)
    assert TokenCodec(KEY).decode(token) == lsn
    assert TokenCodec(b"another key, also long enough").decode(token) is None
    assert TokenCodec(KEY).decode(format_lsn(lsn)) is None  # unsigned: refused


@given(LSNS, st.integers(min_value=0), st.characters(codec="ascii"))
def test_a_tampered_token_is_refused(lsn: int, where: int, char: str) -> None:
    token = TokenCodec(KEY).encode(lsn)
    index = where % len(token)
    tampered = token[:index] + char + token[index + 1 :]
    decoded = TokenCodec(KEY).decode(tampered)
    assert decoded is None or tampered == token or decoded == lsn


@pytest.mark.parametrize(
    "token",
    ["", "0/0", "1/", "/1", "1/2/3", "G/1", "123456789/0", " 1/2", "1/2 ", "x" * 500],
)
def test_malformed_tokens(token: str) -> None:
    assert TokenCodec(None).decode(token) is None


def test_without_a_key_a_signature_is_not_checked() -> None:
    # After the secret is removed, old signed tokens still name a position (which is
    # still checked against the primary before it is honoured).
    token = TokenCodec(KEY).encode(42)
    assert TokenCodec(None).decode(token) == 42


def test_cookie_header_parsing() -> None:
    assert _cookie_value("a=1; rr_lsn=0/3; b=2", "rr_lsn") == "0/3"
    assert _cookie_value('rr_lsn="0/3"', "rr_lsn") == "0/3"
    assert _cookie_value("xrr_lsn=0/3", "rr_lsn") is None
    assert _cookie_value("rr_lsn", "rr_lsn") is None


def test_settings_validate_the_read_your_writes_options() -> None:
    assert RouterSettings.defaults().read_your_writes == "lsn"
    with pytest.raises(ConfigurationError, match="read_your_writes"):
        RouterSettings.defaults(read_your_writes="always")
    with pytest.raises(ConfigurationError, match="lsn_secret: must be at least 16"):
        RouterSettings.defaults(lsn_secret="short")
    with pytest.raises(ConfigurationError, match="lsn_cookie"):
        RouterSettings.defaults(lsn_cookie="no spaces allowed")
    with pytest.raises(ConfigurationError, match="consistency_wait"):
        RouterSettings.defaults(consistency_wait=-1)


def test_the_secret_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "a-very-secret-signing-key"
    settings = RouterSettings.defaults(lsn_secret=secret)
    assert secret not in repr(settings)
    router = ReplicaRouter(URL, settings=settings)
    assert secret not in repr(router)
    assert secret not in str(router.status().to_dict())
    monkeypatch.setenv("REPLICA_ROUTER_LSN_SECRET", secret[:10])
    with pytest.raises(ConfigurationError) as caught:
        RouterSettings()
    assert "REPLICA_ROUTER_LSN_SECRET" in str(caught.value)
    assert secret[:10] not in str(caught.value)


def test_route_policies_are_checked_and_stable() -> None:
    router = ReplicaRouter(URL)
    relaxed = router.reader_with(max_lag_seconds=30, read_your_writes="off")
    assert relaxed is router.reader_with(read_your_writes="off", max_lag_seconds=30)
    assert router.reader_with() is router.reader
    assert relaxed is not router.reader
    names = [r.name for r in router.status().reads]
    assert names == ["default", "read_your_writes=off,max_lag_seconds=30"]
    with pytest.raises(ConfigurationError, match="max_lag_seconds"):
        router.reader_with(max_lag_seconds=-1)
    off = ReplicaRouter(URL, settings=RouterSettings.defaults(read_your_writes="off"))
    with pytest.raises(ConfigurationError, match="READ_YOUR_WRITES=lsn"):
        off.reader_with(read_your_writes="lsn")


def test_consistency_token_outside_any_write_is_none() -> None:
    assert ReplicaRouter(URL).consistency_token() is None
