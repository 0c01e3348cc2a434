"""Hostile input, generated (issue #13): random and mutated bytes on the PostgreSQL socket and on the
control socket (oversized lengths, truncated frames, bad startup packets, SCM_RIGHTS with the wrong
number of fds, garbage control messages, peers that never read, hang-ups at every byte of a
message) while a real client keeps working. After a bounded number of cases: the broker is alive,
every backend serves, its fd count is what it was before, its RSS within a few MB, and the real
client never got a wrong answer.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgreuse.wire import control
from pgreuse.wire.states import SlotState

MAX_SIZE = 2


def _startup(user: bytes = b"postgres", db: bytes = b"pgreuse_test") -> bytes:
    body = struct.pack("!i", 3 << 16) + b"user\0" + user + b"\0database\0" + db + b"\0\0"
    return struct.pack("!i", len(body) + 4) + body


def _query(sql: bytes) -> bytes:
    return b"Q" + struct.pack("!i", len(sql) + 5) + sql + b"\0"


# What a hostile PostgreSQL-protocol client sends: a real startup (and maybe a query) cut at any
# byte or with a byte changed, a length field replaced, or plain random bytes.
_valid = st.sampled_from([
    _startup(),
    _startup() + _query(b"select 1"),
    _startup() + _query(b"select pg_sleep(0.01)") + b"X\0\0\0\x04",
    struct.pack("!ii", 8, 80877103),  # SSLRequest
    struct.pack("!iiii", 16, 80877102, 1 << 30, 12345),  # CancelRequest with an unknown key
])  # fmt: skip


@st.composite
def _pg_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_valid))
    how = draw(st.sampled_from(["cut", "flip", "length", "random", "append"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    elif how == "length":
        at = draw(st.sampled_from([0, 9] if len(data) > 12 else [0]))
        data[at : at + 4] = struct.pack("!i", draw(st.sampled_from([-1, 0, 3, 7, 1 << 30, 0x7FFFFFFF])))
    elif how == "random":
        data = bytearray(draw(st.binary(max_size=200)))
    else:
        data += draw(st.binary(max_size=64))
    return bytes(data)


_CONTROL_MESSAGES = [
    control.encode(control.Hello(control.VERSION, 1)),
    control.encode(control.Hello(control.VERSION + 1, 1)),
    control.encode(control.Want(0)),
    control.encode(control.Want(10_000)),
    control.encode(control.Release(0, 1, control.Outcome.BROKEN)),
    control.encode(control.Dirty(12345)),
    control.encode(control.Poke()),
]
_control_packets = st.one_of(st.binary(max_size=80), st.sampled_from(_CONTROL_MESSAGES))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _pg_case(path: str, data: bytes, ending: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        try:
            s.sendall(data)
            if ending == "read":
                while s.recv(65536):
                    pass
            elif ending == "shut":
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            # "hang up": close at once, whatever the broker sent stays unread (a reset on its side)
        except OSError:
            pass


def _control_case(path: str, packets: list[bytes], fds: int, ending: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        try:
            for i, packet in enumerate(packets):
                if i == 0 and fds:
                    # SCM_RIGHTS nobody asked for, a few fds of /dev/null
                    nulls = [os.open(os.devnull, os.O_RDONLY) for _ in range(fds)]
                    try:
                        s.sendmsg([packet or b"?"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      array.array("i", nulls))])  # fmt: skip
                    finally:
                        for fd in nulls:
                            os.close(fd)
                else:
                    s.send(packet or b"?")
            if ending == "read":
                s.settimeout(0.2)
                while s.recv(65536):
                    pass
        except OSError:
            pass


def test_hostile_bytes_on_both_sockets_cost_nothing(make_broker):
    size = str(MAX_SIZE)
    broker = make_broker("--max-size", size, "--min-size", size, "--client-login-timeout", "0.5")
    broker.settle()
    pid = broker.proc.pid
    pg_path = os.path.join(broker.socket_dir, f".s.PGSQL.{broker.port}")
    real = broker.connect(autocommit=True)
    assert real.execute("select 1").fetchone() == (1,)
    time.sleep(0.3)
    fds_before, rss_before = _fds(pid), _rss_kb(pid)
    answers = [0]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        which=st.sampled_from(["pg", "pg", "control"]),
        data=_pg_bytes(),
        packets=st.lists(_control_packets, min_size=1, max_size=4),
        fds=st.sampled_from([0, 0, 1, 3, 7]),
        ending=st.sampled_from(["hang up", "read", "shut"]),
    )
    def case(which: str, data: bytes, packets: list[bytes], fds: int, ending: str) -> None:
        if which == "pg":
            _pg_case(pg_path, data, ending)
        else:
            _control_case(broker.control_socket, packets, fds, ending)
        answers[0] += 1
        n = answers[0]
        assert real.execute("select %s::int", (n,)).fetchone() == (n,)  # never a wrong answer

    case()
    assert broker.proc.poll() is None, "the broker died"
    # Every hostile connection ends (the login timeout ends the silent ones): the fd count comes
    # back to what it was, and every backend is there and serves.
    deadline = time.monotonic() + 15
    while _fds(pid) > fds_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _fds(pid) <= fds_before, f"{_fds(pid)} fds open in the broker, {fds_before} before"
    snap = broker.wait_for(
        lambda s: s.count(SlotState.IDLE) == MAX_SIZE, what=f"all {MAX_SIZE} backends idle"
    )
    conns = [broker.connect() for _ in range(MAX_SIZE)]
    for i, conn in enumerate(conns):
        assert conn.execute("select %s::int", (i,)).fetchone() == (i,)  # all backends at once
    for conn in conns:
        conn.commit()
        conn.close()
    real.close()
    grew = _rss_kb(pid) - rss_before
    print(f"\n{answers[0]} hostile cases; broker fds {fds_before} -> {_fds(pid)}, RSS +{grew} kB; "
          f"protocol errors {snap.counters['protocol_errors']}")  # fmt: skip
    assert grew < 8 * 1024, f"the broker's RSS grew by {grew} kB"
