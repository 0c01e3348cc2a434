"""The server side of SCRAM-SHA-256: RFC 7677's test vectors, the client steps of wire/auth.py
against it, PostgreSQL's secret format, and every refusal. Scripted bytes only, no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pgreuse.wire import frames
from pgreuse.wire.auth import ScramSteps
from pgreuse.wire.scram_server import (
    ScramExchange,
    ScramRefused,
    ScramSecret,
    auth_sasl,
    auth_sasl_continue,
    auth_sasl_final,
    mock_salt,
    parse_sasl_initial_response,
    saslprep,
)

# RFC 7677 section 3: user "user", password "pencil".
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


class _RfcExchange(ScramExchange):
    """The RFC's server nonce is not base64 of anything: set it as it is."""

    def __init__(self, secret: ScramSecret | None) -> None:
        super().__init__(secret, server_nonce=b"", salt_if_unknown=RFC_SALT)
        self._server_nonce = RFC_SERVER_NONCE


def rfc_secret() -> ScramSecret:
    return ScramSecret.from_password("pencil", RFC_SALT, 4096)


def test_rfc7677_vectors():
    ex = _RfcExchange(rfc_secret())
    assert ex.server_first("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert ex.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_rfc7677_with_a_wrong_password_is_refused_28p01():
    ex = _RfcExchange(ScramSecret.from_password("pencils", RFC_SALT, 4096))
    ex.server_first("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    with pytest.raises(ScramRefused) as info:
        ex.server_final(RFC_CLIENT_FINAL)
    assert (info.value.sqlstate, info.value.reason) == ("28P01", "wrong password")


def test_an_unknown_user_goes_through_the_exchange_and_is_refused_at_the_proof():
    ex = _RfcExchange(None)
    first = ex.server_first("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    assert first == RFC_SERVER_FIRST  # same salt and count as a known user with that salt
    with pytest.raises(ScramRefused) as info:
        ex.server_final(RFC_CLIENT_FINAL)
    assert (info.value.sqlstate, info.value.reason) == ("28P01", "no such user")


def test_the_mock_salt_is_stable_per_user_and_depends_on_the_key():
    assert mock_salt("bob", b"k" * 16) == mock_salt("bob", b"k" * 16)
    assert mock_salt("bob", b"k" * 16) != mock_salt("alice", b"k" * 16)
    assert mock_salt("bob", b"k" * 16) != mock_salt("bob", b"j" * 16)
    assert len(mock_salt("bob", b"")) == 16


@pytest.mark.parametrize("password", ["secret", "", "pässwörd", "I\u00adX", "\u2168"])
def test_the_client_steps_of_wire_auth_log_in(password):
    secret = ScramSecret.from_password(password, b"0123456789abcdef", 4096)
    client = ScramSteps("app", password)
    ex = ScramExchange(secret, server_nonce=b"n" * 18, salt_if_unknown=b"")
    server_first = ex.server_first("SCRAM-SHA-256", client.first())
    server_final = ex.server_final(client.final(server_first))
    client.verify(server_final)  # the client checks the server's signature too


def test_saslprep_maps_as_rfc4013_says():
    # RFC 4013 section 3's examples.
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    with pytest.raises(ValueError, match="U\\+0007"):
        saslprep("\u0007")
    with pytest.raises(ValueError, match="right-to-left"):
        saslprep("\u0627\u0031")


def test_a_prohibited_password_is_used_as_it_is():
    # As libpq and PostgreSQL: a password SASLprep refuses is hashed unprepared. (scramp's client,
    # used by wire/auth.py, refuses such a password instead: the keys are checked by hand here.)
    salted = hashlib.pbkdf2_hmac("sha256", b"bell\x07", b"s" * 16, 4096)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    secret = ScramSecret.from_password("bell\u0007", b"s" * 16)
    assert secret.stored_key == hashlib.sha256(client_key).digest()


def test_the_secret_format_round_trips_and_matches_rfc_keys():
    secret = rfc_secret()
    text = secret.encode()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert ScramSecret.parse(text) == secret
    assert "pencil" not in repr(secret) and secret.encode().split("$")[2][:8] not in repr(secret)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("md5abcdef", "not a SCRAM secret"),
        ("SCRAM-SHA-1$4096:c2FsdA==$a:b", "is not SCRAM-SHA-256"),
        ("SCRAM-SHA-256$x:c2FsdA==$a:b", "iteration count 'x'"),
        ("SCRAM-SHA-256$0:c2FsdA==$a:b", "iteration count '0'"),
        ("SCRAM-SHA-256$4096:***$a:b", "not valid base64"),
        ("SCRAM-SHA-256$4096:c2FsdA==$YQ==:YQ==", "32 bytes"),
    ],
)
def test_a_bad_secret_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        ScramSecret.parse(text)


def _started() -> ScramExchange:
    ex = _RfcExchange(rfc_secret())
    ex.server_first("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    return ex


@pytest.mark.parametrize(
    ("mechanism", "first", "message"),
    [
        ("SCRAM-SHA-256-PLUS", RFC_CLIENT_FIRST, "invalid SASL authentication mechanism"),
        ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
        ("SCRAM-SHA-256", b"x,,n=,r=abc", "channel-binding flag"),
        ("SCRAM-SHA-256", b"n,a=admin,n=,r=abc", "authorization identity"),
        ("SCRAM-SHA-256", b"n,,r=abc", "expected n=<user>,r=<nonce>"),
        ("SCRAM-SHA-256", b"n,,n=,r=", "nonce is empty"),
        ("SCRAM-SHA-256", b"n", "no GS2 header"),
        ("SCRAM-SHA-256", b"n,,n=\xff,r=abc", "not UTF-8"),
    ],
)
def test_a_bad_client_first_message_is_a_protocol_violation(mechanism, first, message):
    with pytest.raises(ScramRefused, match=message) as info:
        _RfcExchange(rfc_secret()).server_first(mechanism, first)
    assert info.value.sqlstate == "08P01"


@pytest.mark.parametrize(
    ("final", "message"),
    [
        (RFC_CLIENT_FINAL.replace(b"c=biws", b"c=eSws"), "channel binding check failed"),
        (RFC_CLIENT_FINAL.replace(b"$k0,", b"$k1,"), "nonce mismatch"),
        (RFC_CLIENT_FINAL.split(b",p=")[0], "expected c=<binding>"),
        (RFC_CLIENT_FINAL[:-8], "proof is not 32 bytes"),
    ],
)
def test_a_bad_client_final_message_is_a_protocol_violation(final, message):
    with pytest.raises(ScramRefused, match=message) as info:
        _started().server_final(final)
    assert info.value.sqlstate == "08P01"


def test_a_final_message_first_is_a_protocol_violation():
    with pytest.raises(ScramRefused, match="before the client-first"):
        _RfcExchange(rfc_secret()).server_final(RFC_CLIENT_FINAL)


def test_the_sasl_messages_are_what_libpq_reads():
    assert frames.parse_auth(_body(auth_sasl())) == (10, b"SCRAM-SHA-256\0\0")
    assert frames.parse_auth(_body(auth_sasl_continue(b"r=x"))) == (11, b"r=x")
    assert frames.parse_auth(_body(auth_sasl_final(b"v=y"))) == (12, b"v=y")


def test_a_sasl_initial_response_is_parsed_and_checked():
    msg = frames.sasl_initial_response("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    assert parse_sasl_initial_response(_body(msg)) == ("SCRAM-SHA-256", RFC_CLIENT_FIRST)
    with pytest.raises(frames.ProtocolError, match="says its data is"):
        parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x09abc")
    with pytest.raises(frames.ProtocolError, match="no data length"):
        parse_sasl_initial_response(b"SCRAM-SHA-256\0")
    with pytest.raises(frames.ProtocolError):
        parse_sasl_initial_response(b"no terminator")


def _body(data: bytes) -> bytes:
    reader = frames.FrameReader()
    reader.feed(data)
    msg = reader.next_message()
    assert msg is not None
    return msg.body
