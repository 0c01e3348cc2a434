"""TLS to the backend against a real PostgreSQL with ``ssl=on`` (certificates made by the tests).

A pool whose backends use TLS is proxy-only: pgreuse connections to it have no lease
(``conn.lease is None``) and their queries go through the broker's proxy on the parking socket.
``sslmode=prefer`` against a server without TLS keeps plaintext backends, and handoff.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import psycopg
import pytest

import pgreuse
from broker_process import CLAIMS, BrokerProcess
from tls_cluster import tls_cluster

PSQL = "/usr/bin/psql"
SSL_OF_BACKEND = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"


def backend_uses_tls(conn: pgreuse.Connection) -> bool:
    row = conn.execute(SSL_OF_BACKEND).fetchone()
    assert row is not None
    return bool(row[0])


def test_require_makes_a_proxy_only_pool(pg_tls, make_broker):
    b = make_broker("--max-size", "2", dsn=pg_tls.tcp_dsn(sslmode="require"))
    with b.connect(autocommit=True) as conn:
        assert backend_uses_tls(conn)
        with conn.transaction():
            conn.execute("select 1")
            assert conn.lease is None  # no handoff: the proxy holds the backend
    # The admin console shows the backends' TLS version and cipher.
    admin_dsn = b.conninfo.replace(f"dbname={b.dbname}", "dbname=pgreuse")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        cur = admin.execute("SHOW SERVERS")
        assert cur.description is not None
        tls_col = [c.name for c in cur.description].index("tls")
        assert all(row[tls_col].startswith("TLSv1.") for row in cur.fetchall())


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_verifying_modes_accept_the_right_server(pg_tls, certs, make_broker, sslmode):
    dsn = pg_tls.tcp_dsn(sslmode=sslmode, sslrootcert=certs.ca, host="localhost")
    b = make_broker(dsn=dsn)
    with b.connect(autocommit=True) as conn:
        assert backend_uses_tls(conn)


def test_verify_full_names_the_wrong_host(pg_tls, certs, make_broker):
    # The certificate is for localhost and 127.0.0.1; connect to 127.0.0.1 under another name.
    dsn = pg_tls.tcp_dsn(
        sslmode="verify-full", sslrootcert=certs.ca, host="wrong.example.com", hostaddr="127.0.0.1"
    )
    b = make_broker(dsn=dsn)
    with pytest.raises(psycopg.OperationalError) as info:
        b.connect()
    message = str(info.value)
    assert "not valid for host 'wrong.example.com'" in message
    assert "sslmode=verify-ca" in message  # what to do
    # verify-ca checks the chain only: the same name is accepted.
    b2 = make_broker(dsn=dsn.replace("verify-full", "verify-ca"))
    with b2.connect(autocommit=True) as conn:
        assert backend_uses_tls(conn)


def test_verify_ca_refuses_a_server_signed_by_another_ca(pg_tls, certs, make_broker):
    b = make_broker(dsn=pg_tls.tcp_dsn(sslmode="verify-ca", sslrootcert=certs.other_ca))
    with pytest.raises(psycopg.OperationalError, match="certificate failed verification"):
        b.connect()


def test_verify_without_root_certificate_refuses_to_start(pg_tls, short_tmp):
    dsn = pg_tls.tcp_dsn(sslmode="verify-full", sslrootcert=os.path.join(short_tmp, "missing.crt"))
    with pytest.raises(RuntimeError, match="exited with 2") as info:
        BrokerProcess(dsn, short_tmp, 6432).start()
    assert "missing.crt' does not exist" in str(info.value)


def test_prefer_without_server_tls_keeps_handoff(pg, make_broker):
    b = make_broker(dsn=pg.tcp_dsn(sslmode="prefer"))
    with b.connect() as conn:
        assert not backend_uses_tls(conn)
        assert (conn.lease is not None) == CLAIMS  # inside the implicit transaction: a claimed backend


def test_prefer_with_server_tls_is_proxied(pg_tls, make_broker):
    dsn = pg_tls.tcp_dsn()
    dsn = dsn.replace("sslmode=disable", "")  # no sslmode on TCP: libpq's default, prefer
    b = make_broker(dsn=dsn)
    with b.connect() as conn:
        assert backend_uses_tls(conn)
        assert conn.lease is None
        conn.rollback()


def test_transaction_copy_error_and_cancel_through_a_tls_pool(pg_tls, make_broker):
    b = make_broker("--max-size", "2", dsn=pg_tls.tcp_dsn(sslmode="require"))
    with b.connect() as conn:
        conn.execute("drop table if exists tls_t; create table tls_t (i int, s text)")
        conn.commit()
        # A transaction spans several statements on one backend, and rolls back.
        pid = conn.execute("select pg_backend_pid()").fetchone()
        conn.execute("insert into tls_t values (-1, 'gone')")
        assert conn.execute("select pg_backend_pid()").fetchone() == pid
        conn.rollback()
        # COPY in and out, large enough to need many TLS records.
        rows = [(i, "x" * (i % 300)) for i in range(5000)]
        with conn.cursor().copy("copy tls_t from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        with conn.cursor().copy("copy (select i, s from tls_t order by i) to stdout") as copy:
            back = [(int(i), s) for i, s in copy.rows()]
        assert back == [(i, s) for i, s in rows]
        conn.commit()
        # An error aborts the transaction, and the connection goes on.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        # Cancel reaches the backend the proxy leased for this connection.
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - t0 < 10
        timer.join()
        conn.rollback()
        assert conn.execute("select count(*) from tls_t").fetchone() == (5000,)
        conn.rollback()


def test_async_connection_through_a_tls_pool(pg_tls, make_broker):
    b = make_broker("--max-size", "2", dsn=pg_tls.tcp_dsn(sslmode="require"))

    async def go() -> None:
        async with await pgreuse.connect_async(b.conninfo) as conn:
            cur = await conn.execute(SSL_OF_BACKEND)
            assert (await cur.fetchone())[0] is True  # type: ignore[index]
            assert conn.lease is None
            await conn.rollback()
            async with conn.transaction():
                await conn.execute("create temp table a_t (i int) on commit drop")
                async with conn.cursor().copy("copy a_t from stdin") as copy:
                    await copy.write(b"1\n2\n3\n")
                cur = await conn.execute("select sum(i) from a_t")
                assert await cur.fetchone() == (6,)
            with pytest.raises(psycopg.errors.UndefinedTable):
                await conn.execute("select * from no_such_table")
            await conn.rollback()

            async def cancel_soon() -> None:
                await asyncio.sleep(0.5)
                await conn.cancel_safe()

            task = asyncio.create_task(cancel_soon())
            with pytest.raises(psycopg.errors.QueryCanceled):
                await conn.execute("select pg_sleep(20)")
            await task
            await conn.rollback()

    asyncio.run(go())


def test_psql_through_a_tls_pool(pg_tls, make_broker):
    b = make_broker(dsn=pg_tls.tcp_dsn(sslmode="require"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    args = [PSQL, "-X", "-At", "-h", b.socket_dir, "-p", str(b.port), "-d", b.dbname]
    args += ["-c", SSL_OF_BACKEND, "-c", "select 1/0", "-c", "select 42"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("t|TLSv1.")
    assert "division by zero" in out.stderr
    assert out.stdout.rstrip().endswith("42")


def test_hostssl_only_server_refuses_plaintext(certs, short_tmp):
    cluster = tls_cluster(certs)
    try:
        cluster.set_hba(["local all all trust", "hostssl all all 127.0.0.1/32 trust"])
        plain = BrokerProcess(cluster.tcp_dsn(sslmode="disable"), short_tmp, 6432).start()
        try:
            with pytest.raises(psycopg.OperationalError, match="no encryption"):
                pgreuse.connect(plain.conninfo)
        finally:
            plain.stop()
        # allow tries plaintext first and then TLS, as libpq does: the pool ends up proxy-only.
        allow = BrokerProcess(cluster.tcp_dsn(sslmode="allow"), short_tmp, 6433).start()
        try:
            with pgreuse.connect(allow.conninfo) as conn:
                assert backend_uses_tls(conn)
                assert conn.lease is None
                conn.rollback()
        finally:
            allow.stop()
    finally:
        cluster.destroy()


def test_set_time_zone_through_a_tls_pool_is_put_back(pg_tls, make_broker):
    # Proxy-only: the broker resets the backend, and the client puts its libpq cache back too.
    b = make_broker("--max-size", "1", dsn=pg_tls.tcp_dsn(sslmode="require"))
    with b.connect(autocommit=True) as a, b.connect(autocommit=True) as other:
        pool_tz = a.info.timezone.key
        a.execute("set time zone 'America/New_York'")
        assert other.execute("show timezone").fetchone() == (pool_tz,)
        # The broker told a's libpq the pool's value; it is applied with the next result.
        assert a.execute("show timezone").fetchone() == (pool_tz,)
        assert a.info.timezone.key == pool_tz
        assert a.lease is None
