"""The proxy's message scanners: the Python references, and the C versions checked against them."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pgreuse import slots
from pgreuse.wire import scan
from pgreuse.wire.frames import MAX_FRAME, frame
from pgreuse.wire.scan import (
    BAD_LENGTH,
    SAW_PARAMETER_STATUS,
    UNSOLICITED_READY,
    scan_client_py,
    scan_server_py,
)

try:
    from pgreuse.wire._speedups import scan_client as scan_client_c
    from pgreuse.wire._speedups import scan_server as scan_server_c
except ImportError:  # not built: only the references can be tested
    scan_client_c = scan_server_c = None

# nox sets this for each leg of the matrix: a build that silently fell back to Python fails here.
EXPECTED = os.environ.get("PGREUSE_EXPECT_SCAN")

ANSWER = (
    frame(b"T", b"\0\x01n\0" + b"\0" * 6 + b"\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
    + frame(b"D", b"\0\x01\0\0\0\x011")
    + frame(b"C", b"SELECT 1\0")
    + frame(b"Z", b"I")
)


def test_the_expected_implementation_runs():
    if EXPECTED is None:
        pytest.skip("PGREUSE_EXPECT_SCAN not set (nox sets it per matrix leg)")
    assert scan.IMPLEMENTATION == EXPECTED
    # The slot words follow the same switch: in a C leg workers claim backends (a leg whose
    # pgreuse._slots did not build would otherwise proxy everything and still pass).
    assert (EXPECTED == "c") == slots.ATOMIC
    if EXPECTED == "c":
        assert scan.scan_server is scan_server_c
        assert scan.scan_client is scan_client_c


def test_an_answer_is_walked_to_its_end():
    assert scan_server_py(ANSWER, 0, 1) == (len(ANSWER), 0, ord("I"), 0)
    # Two answers, the second inside a transaction, one ParameterStatus.
    two = ANSWER + frame(b"S", b"TimeZone\0UTC\0") + frame(b"Z", b"T")
    assert scan_server_py(two, 0, 2) == (len(two), 0, ord("T"), SAW_PARAMETER_STATUS)


def test_a_cut_stops_at_the_last_whole_header():
    # Header cut: the walk stops at the message start; body cut: it points past the end.
    assert scan_server_py(ANSWER[:-3], 0, 1)[0] == len(ANSWER) - 6
    d_start = len(ANSWER) - 6 - len(frame(b"C", b"SELECT 1\0")) - len(frame(b"D", b"\0\x01\0\0\0\x011"))
    pos, syncs, tx, flags = scan_server_py(ANSWER[: d_start + 7], 0, 1)
    assert pos == d_start + len(frame(b"D", b"\0\x01\0\0\0\x011")) and (syncs, tx, flags) == (1, -1, 0)


def test_errors_point_at_the_bad_message():
    bad = ANSWER[:-6] + b"D" + struct.pack("!i", 3) + b"xx"
    assert scan_server_py(bad, 0, 1) == (len(ANSWER) - 6, 1, -1, BAD_LENGTH)
    assert scan_server_py(ANSWER, 0, 0) == (len(ANSWER) - 6, -1, ord("I"), UNSOLICITED_READY)


def _stream(rng: random.Random) -> tuple[bytes, int]:
    """Random server messages (some malformed), and a sync count that may be too small."""
    parts = []
    zs = 0
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.3:
            parts.append(frame(b"Z", rng.choice(b"ITE").to_bytes(1, "big")))
            zs += 1
        elif kind < 0.4:
            parts.append(frame(b"S", b"DateStyle\0ISO\0"))
        elif kind < 0.45:
            parts.append(rng.choice(b"DZS").to_bytes(1, "big") + struct.pack("!i", rng.randint(-5, 3)))
        else:
            body = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 1, 5, 40, 300))))
            parts.append(frame(rng.choice((b"T", b"D", b"C", b"N", b"d", b"1", b"2")), body))
    return b"".join(parts), rng.randint(max(0, zs - 1), zs + 1)


@pytest.mark.skipif(scan_server_c is None and EXPECTED != "c", reason="pgreuse.wire._speedups not built")
def test_c_and_python_agree_on_every_cut_of_random_streams():
    assert scan_server_c is not None, "PGREUSE_EXPECT_SCAN=c but pgreuse.wire._speedups is not built"
    rng = random.Random(20261124)
    for _ in range(400):
        data, syncs = _stream(rng)
        for end in range(len(data) + 1):
            chunk = data[:end]
            for pos in (0, min(end, rng.randint(0, 8))):
                want = scan_server_py(chunk, pos, syncs)
                for kind in (bytes, bytearray, memoryview):
                    assert scan_server_c(kind(chunk), pos, syncs) == want, (data, end, pos, syncs)
    # Random bytes: a stream of garbage must give the same answer too (and never crash).
    for _ in range(2000):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        assert scan_server_c(junk, 0, 3) == scan_server_py(junk, 0, 3), junk


@pytest.mark.skipif(scan_server_c is None and EXPECTED != "c", reason="pgreuse.wire._speedups not built")
def test_c_scanner_rejects_bad_arguments_like_python_would():
    assert scan_server_c is not None
    with pytest.raises(TypeError):
        scan_server_c("text", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative position -1"):
        scan_server_c(b"", -1, 0)
    with pytest.raises(TypeError):
        scan_server_c(b"")  # type: ignore[call-arg]


EXTENDED = (
    frame(b"P", b"\0select $1\0\0\0")
    + frame(b"B", b"\0\0\0\0\0\x01\0\0\0\x011\0\0")
    + frame(b"D", b"P\0")
    + frame(b"E", b"\0\0\0\0\0")
    + frame(b"S", b"")
)


def test_client_reads_of_ordinary_messages_take_the_fast_path():
    q = frame(b"Q", b"select 1\0")
    assert scan_client_py(q, len(q), False) == (1, 0, ord("Q"))
    assert scan_client_py(EXTENDED, len(EXTENDED), False) == (1, 0, ord("P"))
    # Without the Sync: work in flight, no sync point yet.
    no_sync = EXTENDED[:-5]
    assert scan_client_py(no_sync, len(no_sync), False) == (0, 1, ord("P"))
    # COPY data and Flush leave the state as it was.
    copy = frame(b"d", b"1\t2\n") + frame(b"H", b"")
    assert scan_client_py(copy, len(copy), False) == (0, -1, ord("d"))
    # Only the first n bytes count (the proxy passes its whole receive buffer).
    assert scan_client_py(q + b"garbage", len(q), False) == (1, 0, ord("Q"))


@pytest.mark.parametrize(
    ("data", "session_mode"),
    [
        (frame(b"Q", b"select 1\0")[:-1], False),  # a read that ends inside a message
        (frame(b"Q", b"select 1\0") + b"S\0\0", False),  # ... or inside a header
        (frame(b"X", b""), False),  # Terminate
        (frame(b"P", b"s1\0select 1\0\0\0") + frame(b"S", b""), False),  # a named statement
        (b"Q" + struct.pack("!i", 3) + b"xx", False),  # a length below 4
        (b"Q" + struct.pack("!i", MAX_FRAME + 1), False),  # ... or above the limit
    ],
)
def test_client_reads_that_need_the_message_loop(data, session_mode):
    assert scan_client_py(data, len(data), session_mode) == (0, 0, -1)


def test_a_named_statement_is_ordinary_in_session_mode():
    data = frame(b"P", b"s1\0select 1\0\0\0") + frame(b"S", b"")
    assert scan_client_py(data, len(data), True) == (1, 0, ord("P"))


def _client_stream(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.05:
            parts.append(rng.choice(b"QPSX").to_bytes(1, "big") + struct.pack("!i", rng.randint(-5, 4)))
        elif kind < 0.15:
            parts.append(frame(b"P", rng.choice((b"", b"s1")) + b"\0select 1\0\0\0"))
        elif kind < 0.2:
            parts.append(frame(b"P", b""))  # a Parse with no body at all
        else:
            body = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 1, 4, 30))))
            parts.append(
                frame(
                    rng.choice((b"Q", b"S", b"F", b"B", b"D", b"E", b"C", b"H", b"d", b"c", b"f", b"X")), body
                )
            )
    return b"".join(parts)


@pytest.mark.skipif(scan_client_c is None and EXPECTED != "c", reason="pgreuse.wire._speedups not built")
def test_c_and_python_classify_every_cut_of_random_client_reads_alike():
    assert scan_client_c is not None, "PGREUSE_EXPECT_SCAN=c but pgreuse.wire._speedups is not built"
    rng = random.Random(112026)
    for _ in range(400):
        data = _client_stream(rng)
        padded = bytearray(data + b"\xff" * 7)  # bytes past n must not count (the shared buffer)
        for n in range(len(data) + 1):
            for session_mode in (False, True):
                want = scan_client_py(data, n, session_mode)
                assert scan_client_c(data, n, session_mode) == want, (data, n, session_mode)
                assert scan_client_c(memoryview(padded), n, session_mode) == want, (data, n)
    for _ in range(2000):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 48)))
        assert scan_client_c(junk, len(junk), False) == scan_client_py(junk, len(junk), False), junk
    with pytest.raises(ValueError, match="5 bytes asked of a buffer of 4"):
        scan_client_c(b"abcd", 5, False)
