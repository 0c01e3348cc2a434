"""A worker that stops reading its control channel while it keeps asking: the broker's outbox for it
is bounded, the channel is closed with the reason logged, and what it held is taken back."""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from broker_process import BrokerProcess, needs_claims
from pgreuse.broker.control_client import outbox_limit
from pgreuse.client.channel import channel_for
from pgreuse.wire import control
from pgreuse.wire.states import CloseReason, SlotState

HELLO = control.encode(control.Hello(control.VERSION, 1))


def _flood(sock: socket.socket, broker: BrokerProcess, n: int) -> int:
    """Send ``n`` Hellos (each answered with a Welcome) without reading; return how many went."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 30
    while sent < n and time.monotonic() < deadline:
        try:
            sock.send(HELLO)
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)  # the broker reads as fast as it can answer
        except OSError:
            break  # it closed the channel
    return sent


def _wait_logged(broker: BrokerProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in broker.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{broker.log()}"
        time.sleep(0.02)


def test_a_peer_that_never_reads_is_closed_and_the_broker_serves_on(make_broker):
    broker = make_broker("--max-size", "2")
    limit = outbox_limit(2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(broker.control_socket)
        _flood(s, broker, 4 * limit)
        _wait_logged(broker, "stopped reading")
        assert f"(the limit is {limit})" in broker.log()
        # What was queued before the limit may still arrive; then the end of the channel.
        s.setblocking(True)
        s.settimeout(10)
        got, reset = 0, False
        try:
            while s.recv(control.MAX_MESSAGE):
                got += 1
        except ConnectionResetError:
            reset = True  # the broker closed with Hellos of ours unread: the kernel says so
        assert got <= limit + 1
        assert got > 0 or reset
    assert broker.snapshot().counters["clients"] == 0
    with psycopg.connect(broker.conninfo, autocommit=True) as conn:  # the broker serves on
        assert conn.execute("select 1").fetchone() == (1,)


@needs_claims
def test_a_holder_that_never_reads_loses_its_backend_as_if_it_died(make_broker):
    import pgreuse  # noqa: PLC0415

    broker = make_broker("--max-size", "2")
    conn = broker.connect()
    conn.execute("begin")
    conn.execute("select 1")
    assert conn.lease is not None  # a claimed backend: its holder is this process's channel
    slot = conn.lease.slot
    ch = channel_for(broker.control_socket)
    # This process asks and asks on its channel, and reads none of the answers.
    _flood(ch.sock, broker, 4 * outbox_limit(2))
    _wait_logged(broker, "stopped reading")
    snap = broker.wait_for(
        lambda s: (
            s.slots[slot].close_reason is CloseReason.HOLDER_EXITED
            or s.slots[slot].state is not SlotState.LENT
        ),
        what="the backend taken back",
    )
    assert snap.slots[slot].close_reason is CloseReason.HOLDER_EXITED, snap.slots[slot]
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 2")  # its backend was closed under it, as for a dead worker
    conn.close()
    # A new process-wide channel (the dead one is dropped) and a fresh backend serve again.
    with pgreuse.connect(broker.conninfo, autocommit=True) as again:
        assert again.execute("select 3").fetchone() == (3,)
