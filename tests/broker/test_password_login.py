"""The TCP listener with ``--auth-file`` (issue #13, access control): real psycopg clients log in with
SCRAM-SHA-256 with the right password, and are refused as PostgreSQL refuses them (28P01) with a wrong
one, as an unknown user, or without one; the password shows nowhere in the log."""

from __future__ import annotations

import os
import socket
import time

import psycopg
import pytest

from broker_process import BrokerProcess
from pgreuse.wire import frames
from pgreuse.wire.auth import ScramSteps
from pgreuse.wire.scram_server import ScramSecret
from raw_client import messages

PLAIN = "pl@in-Secret-1"
HASHED = "h4shed-Secret-2"
WRONG = "Wr0ng-Secret-3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def tcp_broker(pg, short_tmp):  # type: ignore[no-untyped-def]
    """A broker on 0.0.0.0 (allowed because it authenticates) with two users in its auth file."""
    path = os.path.join(short_tmp, "userlist.txt")
    with open(path, "w") as f:
        f.write('; users of the TCP listener\n"app" "' + PLAIN + '"\n')
        f.write('"reader" "' + ScramSecret.from_password(HASHED, os.urandom(16)).encode() + '" extra\n')
    os.chmod(path, 0o600)
    port = free_port()
    b = BrokerProcess(pg.dsn(), short_tmp, 6432, [
        "--max-size", "2", "--listen-addr", f"0.0.0.0:{port}", "--auth-file", path,
        "--client-login-timeout", "2",
    ])  # fmt: skip
    b.start()
    b.tcp_port = port  # type: ignore[attr-defined]
    yield b
    b.stop()


def tcp(b: BrokerProcess, **params: str) -> psycopg.Connection[tuple[object, ...]]:
    params.setdefault("passfile", "/nonexistent")
    params.setdefault("dbname", b.dbname)
    return psycopg.connect(
        host="127.0.0.1", port=b.tcp_port, sslmode="disable",  # type: ignore[attr-defined]
        autocommit=True, connect_timeout=10, **params,
    )  # fmt: skip


def raw_login(b: BrokerProcess, user: str, password: str) -> dict[str, str] | None:
    """Log in with wire/auth.py's SCRAM client steps: the FATAL fields, or None if logged in."""
    steps = ScramSteps(user, password)
    with socket.create_connection(("127.0.0.1", b.tcp_port), timeout=10) as s:  # type: ignore[attr-defined]
        s.sendall(frames.startup_message({"user": user, "database": b.dbname}))
        for msg in messages(s):
            if msg.type in b"EZ":
                return frames.parse_error_fields(msg.body) if msg.type == b"E" else None
            code, payload = frames.parse_auth(msg.body) if msg.type == b"R" else (0, b"")
            if code == 10:
                s.sendall(frames.sasl_initial_response("SCRAM-SHA-256", steps.first()))
            elif code == 11:
                s.sendall(frames.sasl_response(steps.final(payload)))
            elif code == 12:
                steps.verify(payload)
    raise AssertionError("closed without an answer")


def test_the_right_password_logs_in(tcp_broker, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with tcp(tcp_broker, user="app", password=PLAIN) as conn:
        # Any user of the file gets the pool's backends, which run as the --dsn's user.
        assert conn.execute("select current_user, 42").fetchone() == ("postgres", 42)
        with conn.transaction():
            assert conn.execute("select 1").fetchone() == (1,)
    with tcp(tcp_broker, user="reader", password=HASHED) as conn:  # a SCRAM secret in the file
        assert conn.execute("select 2").fetchone() == (2,)
    assert raw_login(tcp_broker, "app", PLAIN) is None  # the broker proved it knows the secret too
    # The Unix socket still checks the peer's uid, not a password.
    with psycopg.connect(tcp_broker.conninfo, autocommit=True) as conn:
        assert conn.execute("select 3").fetchone() == (3,)


@pytest.mark.parametrize(
    ("user", "password", "why"),
    [("app", WRONG, "wrong password"), ("reader", PLAIN, "wrong password"), ("ghost", PLAIN, "no such user")],
)
def test_a_wrong_password_or_unknown_user_is_refused_as_postgresql_does(tcp_broker, user, password, why):
    with pytest.raises(psycopg.OperationalError) as info:
        tcp(tcp_broker, user=user, password=password)
    assert f'password authentication failed for user "{user}"' in str(info.value)
    refused = raw_login(tcp_broker, user, password)  # (psycopg keeps no SQLSTATE of a failed connect)
    assert refused is not None and (refused["S"], refused["C"]) == ("FATAL", "28P01"), refused
    log = tcp_broker.log()
    assert f"(user '{user}') refused: password authentication failed for user \"{user}\" ({why})" in log
    for secret in (PLAIN, HASHED, WRONG):
        assert secret not in log
    assert tcp_broker.proc.poll() is None


def test_no_password_is_refused_by_the_client(tcp_broker, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        tcp(tcp_broker, user="app")
    deadline = time.monotonic() + 5
    while "closed the connection during password authentication" not in tcp_broker.log():
        assert time.monotonic() < deadline, tcp_broker.log()
        time.sleep(0.05)


def test_the_login_timeout_covers_the_password_exchange(tcp_broker):
    # A client that sends its startup and never answers the SASL request holds its connection no
    # longer than --client-login-timeout (2 s here) from its connect.
    with socket.create_connection(("127.0.0.1", tcp_broker.tcp_port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(frames.startup_message({"user": "app", "database": tcp_broker.dbname}))
        got = list(messages(s))
        elapsed = time.monotonic() - start
    assert [m.type for m in got] == [b"R", b"E"]
    assert frames.parse_auth(got[0].body)[0] == 10  # AuthenticationSASL
    fields = frames.parse_error_fields(got[1].body)
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert "--client-login-timeout (2 s)" in fields["M"]
    assert 1.5 < elapsed < 8


def test_a_client_that_breaks_the_exchange_gets_a_protocol_error(tcp_broker):
    with socket.create_connection(("127.0.0.1", tcp_broker.tcp_port), timeout=10) as s:
        s.sendall(frames.startup_message({"user": "app", "database": tcp_broker.dbname}))
        s.sendall(frames.password_message(b"cleartext"))  # not a SASLInitialResponse
        error = next(frames.parse_error_fields(m.body) for m in messages(s) if m.type == b"E")
    assert error["C"] == "08P01", error
    assert "malformed SASLInitialResponse" in error["M"]


def test_the_admin_console_stays_off_tcp(tcp_broker):
    with pytest.raises(psycopg.OperationalError, match="admin console is not served over TCP"):
        tcp(tcp_broker, user="app", password=PLAIN, dbname="pgreuse")
