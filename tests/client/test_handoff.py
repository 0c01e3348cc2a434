"""The fd handoff, seen from a user's connection: leases, release points, errors, cancel, fork."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import psycopg
import pytest

import pgreuse
from broker_process import CLAIMS, held
from pgreuse.wire import frames
from pgreuse.wire.states import SlotState


def test_lease_only_inside_a_transaction(broker):
    with broker.connect() as conn:
        assert conn.lease is None
        # At rest libpq reports the parking key, never a real backend pid.
        assert conn.info.backend_pid >= 1 << 30
        with conn.transaction():
            (pid,) = conn.execute("select pg_backend_pid()").fetchone()
            assert (conn.lease is not None) == CLAIMS  # claimed, or through the proxy (pure Python)
            assert conn.lease is None or conn.lease.backend_pid == pid
            conn.execute("select 1")
            assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)  # all the way
        assert conn.lease is None
    broker.wait_for(
        lambda s: s.count(SlotState.LENT) == 0 and s.counters["leases"] >= 1, what="lease returned"
    )


def test_commit_and_rollback_reach_postgresql(broker, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists handoff_t; create table handoff_t (v int)")
    with broker.connect() as conn:
        conn.execute("insert into handoff_t values (1)")
        conn.commit()
        conn.execute("insert into handoff_t values (2)")
        conn.rollback()
        with conn.transaction():
            conn.execute("insert into handoff_t values (3)")
    with psycopg.connect(pg.dsn()) as admin:
        rows = admin.execute("select v from handoff_t order by v").fetchall()
    assert rows == [(1,), (3,)]


def test_autocommit_leases_per_statement(broker):
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 1")
        assert conn.lease is None
        assert conn.execute("select 2").fetchone() == (2,)
        assert conn.lease is None
    broker.wait_for(lambda s: s.counters["leases"] >= 2, what="both leases counted")


def test_error_in_transaction_keeps_the_lease_until_rollback(broker):
    with broker.connect() as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        assert held(conn)  # INERROR: the backend holds the failed transaction
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.lease is None
        assert conn.execute("select 5").fetchone() == (5,)
        conn.commit()


def test_copy_stream_named_cursor_and_pipeline(broker):
    with broker.connect() as conn:
        conn.execute("create temp table c (v int) on commit drop")
        with conn.cursor().copy("copy c from stdin") as copy:
            for i in range(100):
                copy.write_row((i,))
        assert conn.execute("select count(*) from c").fetchone() == (100,)
        conn.commit()
        assert conn.lease is None

        # The temp table made that lease dirty: the broker resets the backend, then shares it again.
        broker.settle()
        total = 0
        for (v,) in conn.cursor().stream("select generate_series(1, 1000)"):
            total += v
            assert held(conn)  # mid-stream the backend is still ours
        assert total == 500500
        conn.commit()

        with conn.cursor("named") as cur:
            cur.execute("select generate_series(1, 50)")
            assert len(cur.fetchmany(10)) == 10
            assert len(cur.fetchall()) == 40
        conn.commit()
        assert conn.lease is None

    with broker.connect(autocommit=True) as conn:
        with conn.pipeline():
            cur1 = conn.execute("select 1")
            cur2 = conn.execute("select 2")
        assert (cur1.fetchone(), cur2.fetchone()) == ((1,), (2,))
        assert conn.lease is None


def test_prepare_threshold_is_refused(broker):
    with pytest.raises(pgreuse.NotSupported, match="prepare_threshold=5"):
        broker.connect(prepare_threshold=5)
    with broker.connect() as conn:
        assert conn.prepare_threshold is None
        with pytest.raises(pgreuse.NotSupported, match="prepare_threshold=1"):
            conn.prepare_threshold = 1


def test_startup_parameters_checked_against_the_pool(broker):
    with pytest.raises(psycopg.OperationalError, match='database "nope" is not served'):
        pgreuse.connect(broker.conninfo.replace("dbname=pgreuse_test", "dbname=nope"))
    with pytest.raises(psycopg.OperationalError, match="client_encoding='LATIN1' differs"):
        broker.connect(client_encoding="LATIN1")
    with pytest.raises(psycopg.OperationalError, match="startup options"):
        broker.connect(options="-c TimeZone=America/New_York")
    # Harmless ones are accepted.
    with broker.connect(application_name="checkout-web") as conn:
        assert conn.info.parameter_status("application_name") == "checkout-web"
        assert conn.execute("select 1").fetchone() == (1,)


def test_no_broker_names_the_socket_path(short_tmp):
    with pytest.raises(pgreuse.BrokerUnavailable) as info:
        pgreuse.connect(f"host={short_tmp} port=7777 dbname=x")
    assert f"{short_tmp}/.s.PGREUSE.7777" in str(info.value)
    assert isinstance(info.value, psycopg.OperationalError)


def test_wait_timeout_raises_pool_timeout(make_broker):
    broker = make_broker("--max-size", "1", "--wait-timeout", "0.5")
    holder = broker.connect()
    holder.execute("select 1")  # holds the only backend in a transaction
    other = broker.connect()
    t0 = time.monotonic()
    with pytest.raises(pgreuse.PoolTimeout, match=r"0\.5s") as info:
        other.execute("select 1")
    assert 0.4 < time.monotonic() - t0 < 5
    assert isinstance(info.value, psycopg.OperationalError)
    assert not other.closed  # the caller may retry with the same connection
    holder.commit()
    assert other.execute("select 2").fetchone() == (2,)
    other.commit()
    assert broker.snapshot().counters["timeouts"] == 1
    holder.close()
    other.close()


def test_waiters_are_served_in_order_and_all_get_a_backend(make_broker):
    broker = make_broker("--max-size", "2")
    results: list[int] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with broker.connect() as conn:
                for _ in range(20):
                    with conn.transaction():
                        conn.execute("select pg_sleep(0.001)")
                        results.append(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 160
    # 8 threads on 2 backends must have queued (in the proxy: its counts reach the table in batches)
    snap = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0 and s.counters["waits"] > 0, what="waits")
    assert sum(1 for s in snap.slots if s.state != SlotState.CLOSED) <= 2


def test_cancel_reaches_the_leased_backend(broker):
    conn = broker.connect()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute("select pg_sleep(20)")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t0 = time.monotonic()
    t.start()
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 1, what="lease taken")
    time.sleep(0.2)
    conn.cancel()
    t.join(10)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 10
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.QueryCanceled)
    conn.rollback()
    assert conn.execute("select 3").fetchone() == (3,)
    conn.close()


def test_close_while_leased_rolls_back_and_returns_the_backend(broker, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists close_t; create table close_t (v int)")
    conn = broker.connect()
    conn.execute("insert into close_t values (1)")
    assert held(conn)
    conn.close()
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="lease returned on close")
    with psycopg.connect(pg.dsn()) as admin:
        assert admin.execute("select count(*) from close_t").fetchone() == (0,)
    with broker.connect() as again:  # the backend went back in working order
        assert again.execute("select 1").fetchone() == (1,)


def test_connection_refuses_to_swap_in_a_forked_child(broker):
    conn = broker.connect(autocommit=True)
    conn.execute("select 1")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            try:
                conn.execute("select 1")
            except pgreuse.WrongProcess as exc:
                code = 0 if "post_fork" in str(exc) else 2
            conn.close()  # must not terminate the parent's parking connection
            # A fresh connection opened in the child works.
            with pgreuse.connect(broker.conninfo, autocommit=True) as mine:
                if mine.execute("select 7").fetchone() != (7,):
                    code = 3
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"\0"
    assert conn.execute("select 8").fetchone() == (8,)  # the parent's connection is untouched
    conn.close()


def test_broker_on_the_standard_asyncio_loop(make_broker, monkeypatch):
    # The broker prefers uvloop; PGREUSE_LOOP=asyncio must work just as well.
    monkeypatch.setenv("PGREUSE_LOOP", "asyncio")
    broker = make_broker("--max-size", "1")
    with broker.connect() as conn, conn.transaction():
        assert conn.execute("select 1").fetchone() == (1,)
        assert (conn.lease is not None) == CLAIMS


def _raw_startup(broker, **params: str) -> bytes:
    """The first message type the broker answers a raw StartupMessage with (as JDBC would send it)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(broker.socket_dir, f".s.PGSQL.{broker.port}"))
        s.sendall(frames.startup_message({"user": "postgres", "database": broker.dbname, **params}))
        return s.recv(1)


def test_jdbc_style_extra_float_digits_is_accepted(broker):
    # From PostgreSQL 12 every extra_float_digits > 0 gives the same output as the default.
    assert _raw_startup(broker, extra_float_digits="3") == b"R"  # AuthenticationOk
    assert _raw_startup(broker, extra_float_digits="-2") == b"E"  # ErrorResponse


def test_prepare_true_runs_unprepared_on_shared_backends(make_broker):
    broker = make_broker("--max-size", "1")
    with broker.connect(autocommit=True) as a, broker.connect(autocommit=True) as b:
        for i in range(6):
            for conn in (a, b):
                assert conn.execute("select %s::int", (i,), prepare=True).fetchone() == (i,)
        (n,) = a.execute("select count(*) from pg_prepared_statements").fetchone()
        assert n == 0  # nothing was left on the shared backend


def test_max_waiting_refuses_at_once(make_broker):
    broker = make_broker("--max-size", "1", "--max-waiting", "1", "--wait-timeout", "5")
    holder = broker.connect()
    holder.execute("select 1")  # holds the only backend
    queued = broker.connect()
    waiter = threading.Thread(target=lambda: (queued.execute("select 1"), queued.commit()))
    waiter.start()
    broker.wait_for(lambda s: s.counters["pending"] == 1, what="one request queued")
    with broker.connect() as third:
        t0 = time.monotonic()
        with pytest.raises(pgreuse.TooManyRequests, match="--max-waiting 1"):
            third.execute("select 1")
        assert time.monotonic() - t0 < 4  # refused at once, not after the 5 s wait timeout
    holder.commit()
    waiter.join(10)
    assert broker.snapshot().counters["too_many"] == 1
    holder.close()
    queued.close()


_IMPOSTOR = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind(sys.argv[1])
s.listen()
print("listening", flush=True)
time.sleep(60)
"""


def test_a_broker_socket_of_another_user_is_not_trusted(short_tmp):
    # Someone else's process listening where the broker should be must not get lease requests.
    if os.geteuid() != 0:
        pytest.skip("needs root to run a listener as another user (CI runs as root)")
    os.chmod(short_tmp, 0o777)
    path = os.path.join(short_tmp, ".s.PGREUSE.7777")
    impostor = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", _IMPOSTOR, path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "listening\n"
        with pytest.raises(pgreuse.BrokerUnavailable, match=r"runs as uid \d+, not as this user"):
            pgreuse.connect(f"host={short_tmp} port=7777 dbname=x")
    finally:
        impostor.kill()
        impostor.wait()
        impostor.stdout.close()  # type: ignore[union-attr]
