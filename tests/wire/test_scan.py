"""The server-stream scanner: the Python reference, and the C version checked against it."""

from __future__ import annotations

import os
import random
import struct

import pytest

from pgreuse.wire import scan
from pgreuse.wire.frames import frame
from pgreuse.wire.scan import BAD_LENGTH, SAW_PARAMETER_STATUS, UNSOLICITED_READY, scan_server_py

try:
    from pgreuse._speedups import scan_server as scan_server_c
except ImportError:  # not built: only the reference can be tested
    scan_server_c = None

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
    if EXPECTED == "c":
        assert scan.scan_server is scan_server_c


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


@pytest.mark.skipif(scan_server_c is None and EXPECTED != "c", reason="pgreuse._speedups not built")
def test_c_and_python_agree_on_every_cut_of_random_streams():
    assert scan_server_c is not None, "PGREUSE_EXPECT_SCAN=c but pgreuse._speedups is not built"
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


@pytest.mark.skipif(scan_server_c is None and EXPECTED != "c", reason="pgreuse._speedups not built")
def test_c_scanner_rejects_bad_arguments_like_python_would():
    assert scan_server_c is not None
    with pytest.raises(TypeError):
        scan_server_c("text", 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative position -1"):
        scan_server_c(b"", -1, 0)
    with pytest.raises(TypeError):
        scan_server_c(b"")  # type: ignore[call-arg]
