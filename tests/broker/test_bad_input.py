"""Malformed bytes on either socket close that client only; the broker and its backends carry on."""

from __future__ import annotations

import contextlib
import os
import socket
import struct

import pytest

from broker_process import needs_claims
from pgreuse.wire import control
from pgreuse.wire.states import SlotState

GARBAGE = [
    b"\x00\x00\x00\x03",  # a length shorter than the length field itself
    b"\x7f\xff\xff\xff" + b"x" * 100,  # a startup packet claiming 2 GiB
    struct.pack("!ii", 8, 1234),  # an unknown protocol code
    struct.pack("!ii", 16, 3 << 16) + b"user\0nope",  # a parameter without its terminator
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # the wrong protocol entirely
]


@pytest.mark.parametrize("junk", GARBAGE)
def test_garbage_on_the_postgresql_socket(broker, junk):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(broker.socket_dir, f".s.PGSQL.{broker.port}"))
        s.sendall(junk)
        try:
            while s.recv(4096):  # an ErrorResponse at most, then the broker hangs up
                pass
        except ConnectionResetError:
            pass
    with broker.connect(autocommit=True) as conn:  # everyone else is served as before
        assert conn.execute("select 1").fetchone() == (1,)
    assert broker.proc.poll() is None


@pytest.mark.parametrize(
    "packet",
    [
        b"",  # an empty packet
        b"Z" + b"\0" * 8,  # an unknown message
        b"A\0\0",  # a truncated Acquire
        control.encode(control.Hello(control.VERSION + 7, 1)),  # a version the broker does not speak
        control.encode(control.Release(999, 1, control.Outcome.CLEAN)),  # a slot that does not exist
        b"x" * (control.MAX_MESSAGE + 10),  # an oversized packet
    ],
)
def test_garbage_on_the_control_socket(broker, packet):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(10)
        s.connect(broker.control_socket)
        s.send(packet)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            s.recv(4096)
    with broker.connect(autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
    snap = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="no backend lost")
    assert snap.counters["backends_closed"] == 0  # no backend was lost to the bad client
    assert broker.proc.poll() is None


@needs_claims
def test_a_release_for_someone_elses_lease_is_ignored(broker):
    holder = broker.connect()
    holder.execute("select 1")  # slot held by this process's channel
    lease = holder.lease
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(broker.control_socket)
        s.send(control.encode(control.Hello(control.VERSION, os.getpid())))
        s.recv(4096)
        s.send(control.encode(control.Release(lease.slot, lease.generation, control.Outcome.CLEAN)))
    assert holder.execute("select 3").fetchone() == (3,)  # still ours, still in the transaction
    snap = broker.snapshot()
    assert snap.slots[lease.slot].state == SlotState.LENT
    holder.commit()
    holder.close()
