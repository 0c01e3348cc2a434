"""SimpleQuery driven by scripted server bytes: no sockets."""

from __future__ import annotations

import struct

import pytest

from pgreuse.wire import frames
from pgreuse.wire.frames import ProtocolError
from pgreuse.wire.query import SimpleQuery, parse_data_row


def data_row(*values: str | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            body += struct.pack("!i", -1)
        else:
            raw = v.encode()
            body += struct.pack("!i", len(raw)) + raw
    return frames.frame(b"D", body)


def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return frames.frame(b"T", body)


def complete(tag: str) -> bytes:
    return frames.frame(b"C", tag.encode() + b"\0")


def test_request() -> None:
    assert SimpleQuery("select 1").request() == frames.query("select 1")


def test_select_one_byte_by_byte() -> None:
    answer = row_description("?column?") + data_row("1") + complete("SELECT 1") + frames.ready_for_query(b"I")
    q = SimpleQuery("select 1")
    for i in range(len(answer)):
        assert not q.done
        q.feed(answer[i : i + 1])
    assert q.done
    assert q.rows == [["1"]]
    assert q.command_tags == ["SELECT 1"]
    assert q.error is None
    assert q.transaction_status == b"I"
    assert q.leftover() == b""


def test_multiple_statements_and_async_messages() -> None:
    answer = (
        frames.notice_response("00000", "there is no transaction in progress", severity="WARNING")
        + complete("ROLLBACK")
        + frames.parameter_status("TimeZone", "UTC")
        + complete("SET")
        + frames.frame(b"A", struct.pack("!i", 5) + b"chan\0payload\0")
        + frames.frame(b"I", b"")
        + row_description("a", "b")
        + data_row("x", None)
        + data_row("é", "")
        + complete("SELECT 2")
        + frames.ready_for_query(b"I")
    )
    q = SimpleQuery("rollback; set timezone='UTC'; ; select ...")
    q.feed(answer)
    assert q.done
    assert q.command_tags == ["ROLLBACK", "SET", "SELECT 2"]
    assert q.rows == [["x", None], ["é", ""]]
    assert q.parameters == {"TimeZone": "UTC"}
    assert q.notifications == 1
    assert q.empty_queries == 1
    assert [n.severity for n in q.notices] == ["WARNING"]


def test_error_is_recorded_not_raised() -> None:
    q = SimpleQuery("select 1/0")
    q.feed(frames.error_response("22012", "division by zero") + frames.ready_for_query(b"E") + b"extra")
    assert q.done
    assert q.error is not None
    assert q.error.sqlstate == "22012"
    assert q.transaction_status == b"E"
    assert q.rows == []
    assert q.leftover() == b"extra"


def test_feed_stops_at_ready_for_query() -> None:
    q = SimpleQuery("select 1")
    q.feed(complete("SELECT 0") + frames.ready_for_query(b"T") + complete("X"))
    assert q.done
    assert q.transaction_status == b"T"
    assert q.command_tags == ["SELECT 0"]
    assert q.leftover() == complete("X")


@pytest.mark.parametrize("kind", [b"G", b"H", b"1", b"K"])
def test_unexpected_messages(kind: bytes) -> None:
    q = SimpleQuery("copy t from stdin")
    with pytest.raises(ProtocolError, match=f"unexpected message type {kind!r}"):
        q.feed(frames.frame(kind, b"\0\0\0"))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\0", "1 bytes"),
        (b"\xff\xff", "negative column count"),
        (b"\0\x01\0\0", "truncated before column 0"),
        (b"\0\x01\0\0\0\x05ab", "column 0 has invalid length 5"),
        (b"\0\x01\xff\xff\xff\xfe", "column 0 has invalid length -2"),
        (b"\0\x00x", "1 trailing bytes"),
    ],
)
def test_bad_data_rows(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_data_row(body)


def test_bad_ready_for_query() -> None:
    with pytest.raises(ProtocolError, match="invalid status"):
        SimpleQuery("x").feed(frames.frame(b"Z", b"IT"))
