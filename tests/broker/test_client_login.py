"""Connections that never finish their startup: bounded in time and counted by --max-client-conn.

Issue 13: 500 connections that sent nothing held 500 broker descriptors after 71 s, and were not
counted by --max-client-conn (PgBouncer has client_login_timeout).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import psycopg
import pytest

from pgreuse.wire import frames


def pg_socket(broker) -> socket.socket:  # type: ignore[no-untyped-def]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(15)
    s.connect(os.path.join(broker.socket_dir, f".s.PGSQL.{broker.port}"))
    return s


def answer_then_eof(s: socket.socket) -> dict[str, str]:
    """The ErrorResponse the broker sends before it hangs up (it must hang up)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    reader = frames.FrameReader()
    reader.feed(data)
    msg = reader.next_message()
    assert msg is not None and msg.type == b"E", data
    return frames.parse_error_fields(msg.body)


@pytest.mark.parametrize("sent", [b"", frames.startup_message({"user": "postgres"})[:7]])
def test_a_connection_that_never_finishes_its_startup_is_closed(make_broker, sent):
    b = make_broker("--client-login-timeout", "1")
    with pg_socket(b) as s:
        s.sendall(sent)
        started = time.monotonic()
        fields = answer_then_eof(s)  # before the socket's own 15 s timeout
        assert time.monotonic() - started < 10
    assert fields["S"] == "FATAL"
    assert "--client-login-timeout" in fields["M"]
    with psycopg.connect(b.conninfo, autocommit=True) as conn:  # others are served as before
        assert conn.execute("select 1").fetchone() == (1,)


def test_connections_in_startup_count_toward_max_client_conn(make_broker):
    b = make_broker("--max-client-conn", "2", "--client-login-timeout", "60")
    silent = [pg_socket(b) for _ in range(2)]  # connected, never send a startup packet
    try:
        time.sleep(0.3)  # (accepted by now: the limit is counted at accept)
        with pytest.raises(psycopg.OperationalError, match=r"max_client_conn.*2 of them still starting"):
            psycopg.connect(b.conninfo)
        # One more silent connection, over the limit: refused too, soon, not after a minute.
        with pg_socket(b) as over:
            assert answer_then_eof(over)["C"] == "53300"
    finally:
        silent[0].close()
    deadline = time.monotonic() + 10
    while True:  # room again once the broker has seen the hang-up
        try:
            conn = psycopg.connect(b.conninfo, autocommit=True)
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            continue
        with conn:
            assert conn.execute("select 1").fetchone() == (1,)
        break
    silent[1].close()


def test_a_cancel_is_served_at_the_client_limit(make_broker):
    # A CancelRequest comes on a connection of its own: a full broker must still take it.
    b = make_broker("--max-client-conn", "1")
    with psycopg.connect(b.conninfo, autocommit=True) as conn:
        threading.Timer(0.5, conn.cancel).start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - started < 10


def test_an_encryption_request_is_answered_once(make_broker):
    # As PostgreSQL: one SSLRequest (and one GSSENCRequest) per connection (frames.StartupReader). A
    # peer that repeated them without reading could otherwise fill its socket with the broker's
    # answers, and the startup's replies (sock_sendall, outside the login deadline) would block.
    b = make_broker()
    ssl_request = struct.pack("!ii", 8, 80877103)
    with pg_socket(b) as s:
        s.sendall(ssl_request)
        assert s.recv(1) == b"N"
        s.sendall(ssl_request)
        assert s.recv(100) == b""  # closed at the second
    with psycopg.connect(b.conninfo, sslmode="prefer", autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
