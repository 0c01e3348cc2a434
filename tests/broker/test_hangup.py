"""A proxied client that hangs up mid-message, without reading, costs at most its transaction.

Issue 13: such a client closes with the broker's startup reply unread, so its peer (the broker) gets
ECONNRESET with data still queued. uvloop stops calling a reader after the error (libuv closes the
poll handle on POLLERR); the session kept its backend forever. Both listeners, both event loops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

import psycopg
import pytest

from pgreuse.wire import frames
from pgreuse.wire.states import SlotState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hang_up_mid_query(sock: socket.socket, dbname: str) -> None:
    """Startup, a Query announcing 60 MB with 2 MB of it, then close without reading anything."""
    sock.sendall(frames.startup_message({"user": "postgres", "database": dbname}))
    sock.sendall(b"Q" + struct.pack("!i", 60 * 1024 * 1024 + 4))
    sock.settimeout(2)
    with contextlib.suppress(TimeoutError):  # the broker stops reading at its buffer bound
        sock.sendall(b"x" * (2 * 1024 * 1024))
    # The startup reply is unread: closing now resets the connection (the peer gets ECONNRESET).
    sock.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("listener", ["unix", "tcp"])
@pytest.mark.parametrize("busy", [True, False], ids=["queued", "leased"])
def test_a_client_that_hangs_up_mid_message_loses_no_backend(make_broker, monkeypatch, loop, listener, busy):
    if loop == "asyncio":
        monkeypatch.setenv("PGREUSE_LOOP", "asyncio")
    port = free_port()
    b = make_broker("--max-size", "2", "--wait-timeout", "5", "--listen-addr", f"127.0.0.1:{port}")
    deadline = time.monotonic() + 10  # (the broker logs it just after its sockets appear)
    while f"event loop: {loop}" not in b.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"event loop: {loop}" in b.log()
    # queued: both backends held, the query waits for one; leased: it gets one at once.
    holders = [psycopg.connect(b.conninfo) for _ in range(2 if busy else 0)]
    for h in holders:
        h.execute("select 1")  # inside a transaction: both backends are held
    if listener == "unix":
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(os.path.join(b.socket_dir, f".s.PGSQL.{b.port}"))
    else:
        raw = socket.create_connection(("127.0.0.1", port))
    with b.console() as admin:
        hang_up_mid_query(raw, b.dbname)
        # It sent its query (queued for a backend), or the broker already saw it leave.
        deadline = time.monotonic() + 10
        while True:
            clients = admin.execute("SHOW CLIENTS").fetchall()
            if len(clients) == len(holders) or any(c["state"] == "waiting" for c in clients):
                break
            assert time.monotonic() < deadline, clients
            time.sleep(0.05)
        for h in holders:
            h.commit()  # the gone client's query now gets a backend, and must not keep it
        # Both backends serve new clients at once (two transactions open together).
        with psycopg.connect(b.conninfo, connect_timeout=10) as c1, psycopg.connect(b.conninfo) as c2:
            c1.execute("set local statement_timeout = '15s'")
            c2.execute("set local statement_timeout = '15s'")
            assert c1.execute("select 1").fetchone() == (1,)
            assert c2.execute("select 2").fetchone() == (2,)
        servers = admin.execute("SHOW SERVERS").fetchall()
        assert [s for s in servers if s["state"] == "active"] == [], servers
        # The two holders alone (c1 and c2 leave through their EOF, a moment after close()).
        deadline = time.monotonic() + 10
        while len(clients := admin.execute("SHOW CLIENTS").fetchall()) != len(holders):
            assert time.monotonic() < deadline, clients
            time.sleep(0.05)
        assert [c["state"] for c in clients] == ["idle"] * len(holders), clients
    for h in holders:
        h.close()
    snap = b.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="every backend back")
    assert snap.count(SlotState.IDLE) + snap.count(SlotState.CONNECTING) == 2
    assert "connection error" in b.log()
    assert b.proc.poll() is None
