"""The connector: conninfo parsing, and opening/querying/cancelling backends on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import getpass
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pgreuse.broker.backend_target import BackendTarget, EncryptionNotSupported, parse_target
from pgreuse.broker.connector import (
    BackendConnectError,
    BackendQueryError,
    OpenedBackend,
    open_backend,
    run_simple_query,
    send_cancel,
)
from pgreuse.broker.tls import TLSConfigError
from pgreuse.wire.query import SimpleQuery

# --- parse_target: no server needed ---------------------------------------------------------------


def test_defaults_like_libpq() -> None:
    target = parse_target("", env={})
    user = getpass.getuser()
    assert target == BackendTarget(
        host="/var/run/postgresql",
        port=5432,
        is_unix=True,
        user=user,
        database=user,
        password=None,
        options=None,
        application_name=None,
        connect_timeout=10.0,
        sslmode="prefer",
    )
    assert target.describe() == (
        f"unix socket /var/run/postgresql/.s.PGSQL.5432 (user {user}, database {user})"
    )


def test_environment_fallbacks() -> None:
    env = {
        "PGHOST": "/tmp/sock",
        "PGPORT": "6543",
        "PGUSER": "envuser",
        "PGPASSWORD": "envpass",
        "PGDATABASE": "envdb",
        "PGOPTIONS": "-c work_mem=64MB",
        "PGAPPNAME": "envapp",
        "PGCONNECT_TIMEOUT": "3",
        "PGSSLMODE": "require",  # ignored on a Unix socket, as libpq does
    }
    target = parse_target("", env=env)
    assert (target.host, target.port, target.is_unix) == ("/tmp/sock", 6543, True)
    assert (target.user, target.password, target.database) == ("envuser", "envpass", "envdb")
    assert (target.options, target.application_name) == ("-c work_mem=64MB", "envapp")
    assert target.connect_timeout == 3.0
    assert target.socket_path == "/tmp/sock/.s.PGSQL.6543"
    # The conninfo wins over the environment.
    target = parse_target("user=given dbname=gdb port=7000", env=env)
    assert (target.user, target.database, target.port) == ("given", "gdb", 7000)


def test_tcp_and_hostaddr() -> None:
    target = parse_target("host=db.example hostaddr=10.0.0.5 sslmode=disable user=app", env={})
    assert (target.host, target.is_unix, target.database) == ("10.0.0.5", False, "app")
    assert target.describe() == "tcp 10.0.0.5:5432 (user app, database app)"
    target = parse_target("postgresql://u:p%40ss@[::1]:5433/d?sslmode=disable", env={})
    assert (target.host, target.port, target.password) == ("::1", 5433, "p@ss")
    assert target.address() == "tcp [::1]:5433"
    assert "p@ss" not in repr(target)


@pytest.mark.parametrize(
    "conninfo", ["host=a,b sslmode=disable", "host=/tmp port=5432,5433", "hostaddr=1.2.3.4,5.6.7.8"]
)
def test_several_hosts_refused(conninfo: str) -> None:
    with pytest.raises(ValueError, match="several servers, which pgreuse does not support yet"):
        parse_target(conninfo, env={})


@pytest.mark.parametrize(
    ("conninfo", "match"),
    [
        ("port=abc", "invalid port 'abc'"),
        ("port=70000", "invalid port 70000"),
        ("connect_timeout=soon", "invalid connect_timeout 'soon'"),
        ("host=/tmp sslmode=sometimes", "invalid sslmode 'sometimes'"),
        ("nonsense", "invalid backend conninfo"),
    ],
)
def test_bad_values(conninfo: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_target(conninfo, env={})


def test_tls_settings_like_libpq(tmp_path: Any) -> None:
    # libpq's default on TCP is sslmode=prefer: TLS if the server offers it.
    target = parse_target("host=127.0.0.1", env={"HOME": str(tmp_path)})
    assert (target.sslmode, target.tls_possible, target.tls_required) == ("prefer", True, False)
    assert target.server_name == "127.0.0.1"
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    env = {"PGSSLMODE": "require", "PGSSLCERT": "/c", "PGSSLKEY": "/k"}
    with pytest.raises(TLSConfigError, match="sslcert='/c' with sslkey='/k' cannot be loaded"):
        parse_target("host=db.example.com", env=env)
    # require + a root certificate verifies the chain (libpq), so a bad file is an error.
    with pytest.raises(TLSConfigError, match=f"sslrootcert '{ca}' cannot be loaded"):
        parse_target("host=db.example.com", env={"PGSSLMODE": "require", "PGSSLROOTCERT": str(ca)})
    target = parse_target("host=db.example.com hostaddr=10.0.0.1 sslmode=allow", env={})
    assert (target.host, target.server_name, target.sslmode) == ("10.0.0.1", "db.example.com", "allow")
    # A verifying mode needs a root certificate, and says which file it looked for.
    with pytest.raises(TLSConfigError, match=r"sslmode=verify-full .* root certificate file '/nope'"):
        parse_target("host=127.0.0.1 sslmode=verify-full sslrootcert=/nope", env={})
    with pytest.raises(TLSConfigError, match="sslrootcert=system needs sslmode=verify-full"):
        parse_target("host=127.0.0.1 sslmode=verify-ca sslrootcert=system", env={})
    assert parse_target("host=127.0.0.1 sslrootcert=system", env={}).sslmode == "verify-full"
    with pytest.raises(EncryptionNotSupported, match="gssencmode=require"):
        parse_target("host=/tmp gssencmode=require", env={})
    # sslmode means nothing on a Unix socket (libpq ignores it there too).
    unix = parse_target("host=/tmp sslmode=require", env={})
    assert (unix.sslmode, unix.tls_possible, unix.tls_required) == ("require", False, False)


def test_connect_timeout_zero_means_default() -> None:
    assert parse_target("connect_timeout=0", env={}).connect_timeout == 10.0


# --- against a real server ------------------------------------------------------------------------


async def _open(target: BackendTarget, **kwargs: Any) -> OpenedBackend:
    return await open_backend(target, **kwargs)


def sock_info(sock: socket.socket) -> dict[str, int]:
    info = {"family": sock.family.value, "timeout_ms": int((sock.gettimeout() or 0) * 1000)}
    if sock.family != socket.AF_UNIX:
        info["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        info["keepalive"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    return info


def open_and_query(
    target: BackendTarget, sql: str = "select current_user, current_database()", **kwargs: Any
) -> tuple[OpenedBackend, SimpleQuery, dict[str, int]]:
    """Open, run ``sql``, close; also return the socket's settings as they were while open."""

    async def go() -> tuple[OpenedBackend, SimpleQuery, dict[str, int]]:
        opened = await open_backend(target, **kwargs)
        try:
            info = sock_info(opened.sock)
            return opened, await run_simple_query(opened.stream, sql, timeout=10), info
        finally:
            opened.sock.close()

    return asyncio.run(go())


def test_open_unix_trust(pg: Any) -> None:
    target = parse_target(pg.dsn(), env={})
    assert target.is_unix
    opened, q, info = open_and_query(target)
    assert info == {"family": socket.AF_UNIX, "timeout_ms": 0}  # timeout 0: non-blocking
    assert opened.backend_pid > 0
    assert "server_version" in opened.parameters
    assert opened.parameters["client_encoding"]
    assert opened.connect_seconds > 0
    assert q.rows == [["postgres", "pgreuse_test"]]
    assert q.transaction_status == b"I"


@pytest.mark.parametrize(
    ("user", "password", "method"),
    [
        ("md5user", "md5pass", "md5"),
        ("scramuser", "scrampass", "scram-sha-256"),
        ("pwuser", "pwpass", "password"),
    ],
)
def test_open_tcp_password_methods(
    pg: Any, caplog: pytest.LogCaptureFixture, user: str, password: str, method: str
) -> None:
    target = parse_target(pg.tcp_dsn(user=user, password=password), env={})
    assert not target.is_unix
    with caplog.at_level(logging.DEBUG, logger="pgreuse.broker"):
        _, q, info = open_and_query(target)
    assert info["family"] == socket.AF_INET
    assert info["timeout_ms"] == 0
    assert info["nodelay"]
    assert info["keepalive"]
    assert q.rows == [[user, "pgreuse_test"]]
    # The server really used the method under test (pg_hba.conf could have said trust).
    assert f"(auth {method})" in caplog.text


def test_password_from_environment(pg: Any) -> None:
    target = parse_target(pg.tcp_dsn(user="scramuser"), env={"PGPASSWORD": "scrampass"})
    _, q, _ = open_and_query(target, "select 1")
    assert q.rows == [["1"]]


@pytest.mark.parametrize("user", ["md5user", "scramuser", "pwuser"])
def test_wrong_password(pg: Any, user: str) -> None:
    target = parse_target(pg.tcp_dsn(user=user, password="nope"), env={})
    with pytest.raises(BackendConnectError) as info:
        asyncio.run(_open(target))
    message = str(info.value)
    assert message.startswith(
        f"cannot open a backend on tcp 127.0.0.1:{pg.port} (user {user}, database pgreuse_test): "
        f'FATAL:  password authentication failed for user "{user}"'
    )
    assert "(SQLSTATE 28P01)" in message


def test_missing_password(pg: Any) -> None:
    target = parse_target(pg.tcp_dsn(user="md5user"), env={})
    with pytest.raises(BackendConnectError, match=r"none was given: put password=\.\.\."):
        asyncio.run(_open(target))


def test_unknown_database(pg: Any) -> None:
    target = parse_target(pg.dsn(dbname="no_such_db"), env={})
    with pytest.raises(BackendConnectError, match=r"database \"no_such_db\" does not exist.*3D000"):
        asyncio.run(_open(target))


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    yield port


def test_closed_port(closed_port: int) -> None:
    target = parse_target(f"host=127.0.0.1 port={closed_port} sslmode=disable user=x", env={})
    with pytest.raises(BackendConnectError) as info:
        asyncio.run(_open(target))
    assert str(info.value) == (
        f"cannot open a backend on tcp 127.0.0.1:{closed_port} (user x, database x): connection refused"
    )
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_missing_unix_socket(short_tmp: str) -> None:
    target = parse_target(f"host={short_tmp} user=x", env={})
    with pytest.raises(BackendConnectError, match=f"unix socket {short_tmp}/.s.PGSQL.5432"):
        asyncio.run(_open(target))


def test_server_that_never_answers_times_out() -> None:
    with socket.socket() as listener:
        # Connections complete in the backlog, then nothing is ever said to them.
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        conninfo = f"host=127.0.0.1 port={port} sslmode=disable user=x connect_timeout=0.3"
        target = parse_target(conninfo, env={})
        with pytest.raises(BackendConnectError, match=r"no answer within 0.3 s \(connect_timeout\)"):
            asyncio.run(_open(target))


def test_tls_required_but_server_has_none(pg: Any) -> None:
    target = parse_target(pg.tcp_dsn(sslmode="require"), env={})
    with pytest.raises(BackendConnectError, match="sslmode=require requires TLS, but the server does not"):
        asyncio.run(_open(target))


def test_prefer_without_server_tls_is_plaintext(pg: Any) -> None:
    opened, q, _ = open_and_query(parse_target(pg.tcp_dsn(sslmode="prefer"), env={}), "select 1")
    assert opened.tls is None
    assert q.rows == [["1"]]


def test_run_simple_query_select_1(pg: Any) -> None:
    _, q, _ = open_and_query(parse_target(pg.dsn(), env={}), "select 1")
    assert q.rows == [["1"]]
    assert q.command_tags == ["SELECT 1"]
    assert q.error is None


def test_run_simple_query_error_and_reuse(pg: Any) -> None:
    async def go() -> tuple[SimpleQuery, SimpleQuery]:
        opened = await open_backend(parse_target(pg.dsn(), env={}))
        try:
            bad = await run_simple_query(opened.sock, "select 1/0", timeout=10)
            good = await run_simple_query(opened.sock, "select 2; select null", timeout=10)
            return bad, good
        finally:
            opened.sock.close()

    bad, good = asyncio.run(go())
    assert bad.error is not None
    assert bad.error.sqlstate == "22012"
    assert bad.transaction_status == b"I"
    assert good.rows == [["2"], [None]]


def test_options_and_application_name(pg: Any) -> None:
    target = parse_target(pg.dsn(options="-c work_mem=5MB", application_name="conn-test"), env={})
    _, q, _ = open_and_query(
        target,
        "show work_mem; show statement_timeout; show application_name",
        extra_options="-c statement_timeout=1234",
    )
    assert q.rows == [["5MB"], ["1234ms"], ["conn-test"]]


def test_run_simple_query_timeout_and_closed(pg: Any) -> None:
    async def go() -> None:
        opened = await open_backend(parse_target(pg.dsn(), env={}))
        try:
            with pytest.raises(BackendQueryError, match=r"no answer within 0\.2 s"):
                await run_simple_query(opened.sock, "select pg_sleep(5)", timeout=0.2)
        finally:
            opened.sock.close()
        opened = await open_backend(parse_target(pg.dsn(), env={}))
        try:
            with pytest.raises(BackendQueryError, match="closed the connection"):
                # The server ends the session: EOF instead of ReadyForQuery.
                await run_simple_query(
                    opened.sock, "select pg_terminate_backend(pg_backend_pid())", timeout=10
                )
        finally:
            opened.sock.close()

    asyncio.run(go())


def test_send_cancel(pg: Any) -> None:
    target = parse_target(pg.dsn(), env={})

    async def go() -> SimpleQuery:
        victim = await open_backend(target)
        watcher = await open_backend(target)
        try:
            sleeping = asyncio.create_task(run_simple_query(victim.sock, "select pg_sleep(10)", timeout=20))
            # Cancel only once the query runs: a cancel that arrives first is simply lost.
            probe = (
                f"select state from pg_stat_activity where pid = {victim.backend_pid} and state = 'active'"
            )
            for _ in range(200):
                q = await run_simple_query(watcher.sock, probe, timeout=10)
                if q.rows:
                    break
                await asyncio.sleep(0.02)
            await send_cancel(target, victim.backend_pid, victim.backend_secret)
            return await asyncio.wait_for(sleeping, 5)
        finally:
            victim.sock.close()
            watcher.sock.close()

    q = asyncio.run(go())
    assert q.error is not None
    assert q.error.sqlstate == "57014"
    assert q.transaction_status == b"I"


def test_send_cancel_closed_port(closed_port: int) -> None:
    target = parse_target(f"host=127.0.0.1 port={closed_port} sslmode=disable user=x", env={})
    with pytest.raises(BackendConnectError, match=f"tcp 127.0.0.1:{closed_port}.*refused"):
        asyncio.run(send_cancel(target, 1, 2))
