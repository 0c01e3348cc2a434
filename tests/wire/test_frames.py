"""Framing: bytes in, messages out, no sockets."""

from __future__ import annotations

import struct

import pytest

from pgreuse.wire import frames
from pgreuse.wire.frames import (
    CancelRequest,
    ErrorFields,
    FrameReader,
    GSSENCRequest,
    Message,
    ProtocolError,
    SSLRequest,
    StartupMessage,
    StartupReader,
)


def read_all(reader: FrameReader) -> list[Message]:
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


def test_frame_reader_whole_and_byte_by_byte() -> None:
    stream = (
        frames.auth_ok()
        + frames.parameter_status("TimeZone", "UTC")
        + frames.backend_key_data(1234, 0xDEADBEEF)
        + frames.ready_for_query(b"I")
    )
    whole = FrameReader()
    whole.feed(stream)
    expected = read_all(whole)
    assert [m.type for m in expected] == [b"R", b"S", b"K", b"Z"]
    assert whole.buffered == 0

    slow = FrameReader()
    got: list[Message] = []
    for i in range(len(stream)):
        slow.feed(stream[i : i + 1])
        got += read_all(slow)
    assert got == expected
    assert [m.to_bytes() for m in got] == [
        frames.auth_ok(),
        frames.parameter_status("TimeZone", "UTC"),
        frames.backend_key_data(1234, 0xDEADBEEF),
        frames.ready_for_query(b"I"),
    ]


def test_frame_reader_many_messages_and_rest() -> None:
    reader = FrameReader()
    reader.feed(frames.query("select 1") * 10_000 + b"Q\x00\x00")
    assert len(read_all(reader)) == 10_000
    assert reader.rest() == b"Q\x00\x00"
    assert reader.buffered == 0


@pytest.mark.parametrize("length", [0, 3, -1])
def test_frame_reader_rejects_short_length(length: int) -> None:
    reader = FrameReader()
    reader.feed(b"Z" + struct.pack("!i", length))
    with pytest.raises(ProtocolError, match=f"invalid length {length}"):
        reader.next_message()


def test_frame_reader_rejects_oversized_before_buffering() -> None:
    reader = FrameReader(max_frame=1000)
    reader.feed(b"D" + struct.pack("!i", 1001))
    with pytest.raises(ProtocolError, match="length 1001, above the limit of 1000"):
        reader.next_message()


def test_frame_reader_empty_body() -> None:
    reader = FrameReader()
    reader.feed(frames.terminate())
    assert reader.next_message() == Message(b"X", b"")


# --- startup packets -------------------------------------------------------------------------------


def test_startup_message_round_trip_byte_by_byte() -> None:
    params = {"user": "app", "database": "db", "options": "-c x=1", "application_name": "é"}
    data = frames.startup_message(params, minor=2) + frames.query("select 1")
    reader = StartupReader()
    packet = None
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        packet = packet or reader.next_packet()
    assert packet == StartupMessage(3, 2, params)
    assert reader.done
    assert reader.next_packet() is None
    assert reader.rest() == frames.query("select 1")


def test_ssl_then_gss_then_startup() -> None:
    reader = StartupReader()
    reader.feed(frames.ssl_request())
    assert reader.next_packet() == SSLRequest()
    assert not reader.done
    reader.feed(frames.gssenc_request())
    assert reader.next_packet() == GSSENCRequest()
    reader.feed(frames.startup_message({"user": "u"}))
    assert reader.next_packet() == StartupMessage(3, 0, {"user": "u"})
    assert reader.rest() == b""


def test_bytes_pipelined_after_ssl_request_are_rejected() -> None:
    reader = StartupReader()
    reader.feed(frames.ssl_request() + frames.startup_message({"user": "u"}))
    with pytest.raises(ProtocolError, match="unencrypted bytes after SSLRequest"):
        reader.next_packet()


def test_second_ssl_request_rejected() -> None:
    reader = StartupReader()
    reader.feed(frames.ssl_request())
    reader.next_packet()
    reader.feed(frames.ssl_request())
    with pytest.raises(ProtocolError, match="second SSLRequest"):
        reader.next_packet()


def test_cancel_request_round_trip() -> None:
    reader = StartupReader()
    reader.feed(frames.cancel_request(4242, 0xFFFFFFFF))
    assert reader.next_packet() == CancelRequest(4242, 0xFFFFFFFF)
    assert reader.done


@pytest.mark.parametrize("length", [0, 7, 10_001, -5])
def test_startup_bad_length(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!ii", length, 196608))
    with pytest.raises(ProtocolError, match=f"invalid startup packet length {length}"):
        reader.next_packet()


def test_startup_unknown_code() -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!ii", 8, 2 << 16))
    with pytest.raises(ProtocolError, match=r"unsupported frontend protocol 2\.0"):
        reader.next_packet()
    reader = StartupReader()
    reader.feed(struct.pack("!ii", 8, 1234 << 16 | 9999))
    with pytest.raises(ProtocolError, match=r"1234\.9999"):
        reader.next_packet()


def test_cancel_request_bad_length() -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!iii", 12, frames.CANCEL_REQUEST_CODE, 1))
    with pytest.raises(ProtocolError, match="invalid CancelRequest length 12"):
        reader.next_packet()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"user\0app\0", "missing the final NUL"),
        (b"user\0app", "value of startup parameter b'user' is not NUL-terminated"),
        (b"user", "startup parameter name b'user' is not NUL-terminated"),
        (b"user\0app\0\0xx", "2 bytes after the terminator"),
        (b"user\0\xff\xfe\0\0", "not valid UTF-8"),
    ],
)
def test_startup_bad_params(payload: bytes, match: str) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!ii", 8 + len(payload), frames.PROTOCOL_3_0) + payload)
    with pytest.raises(ProtocolError, match=match):
        reader.next_packet()


def test_direct_tls_rejected_clearly() -> None:
    reader = StartupReader()
    reader.feed(b"\x16\x03\x01\x02\x00")
    with pytest.raises(ProtocolError, match="sslnegotiation=direct"):
        reader.next_packet()


# --- builders and parsers --------------------------------------------------------------------------


def body_of(data: bytes) -> Message:
    reader = FrameReader()
    reader.feed(data)
    msg = reader.next_message()
    assert msg is not None
    assert reader.buffered == 0
    return msg


def test_error_response_round_trip_and_str() -> None:
    msg = body_of(
        frames.error_response(
            "28P01",
            'password authentication failed for user "app"',
            severity="FATAL",
            detail="d",
            hint="h",
        )
    )
    assert msg.type == b"E"
    fields = frames.parse_error_fields(msg.body)
    assert fields == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": 'password authentication failed for user "app"',
        "D": "d",
        "H": "h",
    }
    err = ErrorFields(fields)
    assert err.sqlstate == "28P01"
    assert err.severity == "FATAL"
    assert err.message == 'password authentication failed for user "app"'
    assert str(err) == ('FATAL:  password authentication failed for user "app"\nDETAIL:  d\nHINT:  h')
    assert err.summary() == 'FATAL:  password authentication failed for user "app" (SQLSTATE 28P01)'


def test_notice_response() -> None:
    msg = body_of(frames.notice_response("00000", "hello"))
    assert msg.type == b"N"
    err = ErrorFields.from_body(msg.body)
    assert (err.severity, err.sqlstate, err.detail, err.hint) == ("NOTICE", "00000", None, None)


def test_localized_severity_shown_like_psql() -> None:
    err = ErrorFields({"S": "FATAL", "V": "FATAL", "C": "3D000", "M": "nope"})
    assert str(err) == "FATAL:  nope"
    err = ErrorFields({"S": "FEHLER", "V": "ERROR", "M": "x"})
    assert err.severity == "ERROR"
    assert str(err) == "FEHLER:  x"
    assert ErrorFields({}).sqlstate == "XX000"


@pytest.mark.parametrize(
    ("body", "match"),
    [(b"Mabc", "error field 'M'"), (b"Mabc\0", "final NUL"), (b"", "final NUL")],
)
def test_parse_error_fields_rejects(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        frames.parse_error_fields(body)


def test_parameter_status_round_trip() -> None:
    msg = body_of(frames.parameter_status("server_version", "17.2"))
    assert frames.parse_parameter_status(msg.body) == ("server_version", "17.2")
    with pytest.raises(ProtocolError, match="trailing bytes"):
        frames.parse_parameter_status(b"a\0b\0c")
    with pytest.raises(ProtocolError, match="not NUL-terminated"):
        frames.parse_parameter_status(b"a\0b")


def test_backend_key_data_round_trip() -> None:
    msg = body_of(frames.backend_key_data(99, 2**32 - 1))
    assert frames.parse_backend_key_data(msg.body) == (99, 2**32 - 1)
    with pytest.raises(ProtocolError, match="BackendKeyData body has 12 bytes"):
        frames.parse_backend_key_data(b"\0" * 12)


def test_parse_auth() -> None:
    assert frames.parse_auth(body_of(frames.auth_ok()).body) == (0, b"")
    assert frames.parse_auth(struct.pack("!i", 5) + b"salt") == (5, b"salt")
    with pytest.raises(ProtocolError, match="2 bytes"):
        frames.parse_auth(b"\0\0")


def test_ready_for_query() -> None:
    assert frames.ready_for_query(b"T") == b"Z\0\0\0\x05T"
    with pytest.raises(ValueError, match="b'X'"):
        frames.ready_for_query(b"X")


def test_simple_builders() -> None:
    assert frames.query("select 1") == b"Q\0\0\0\x0dselect 1\0"
    assert frames.terminate() == b"X\0\0\0\x04"
    assert frames.ssl_request() == struct.pack("!ii", 8, 80877103)
    assert frames.cancel_request(1, 2) == struct.pack("!iiII", 16, 80877102, 1, 2)
    assert frames.password_message(b"pw\0") == b"p\0\0\0\x07pw\0"
    assert frames.sasl_response(b"abc") == b"p\0\0\0\x07abc"
    assert frames.sasl_initial_response("SCRAM-SHA-256", b"xy") == (
        b"p" + struct.pack("!i", 4 + 14 + 4 + 2) + b"SCRAM-SHA-256\0" + struct.pack("!i", 2) + b"xy"
    )
    msg = body_of(frames.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]))
    assert msg == Message(b"v", struct.pack("!ii", 196608, 2) + b"_pq_.a\0_pq_.b\0")


def test_nul_in_string_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        frames.query("select '\0'")
