"""Fault injection: processes really killed, backends really terminated, servers really restarted."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

import pgreuse
from broker_process import BrokerProcess, needs_claims
from pgreuse.client.claims import CHECK_AFTER_NS
from pgreuse.wire.states import SlotState


def _fork(fn) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Run ``fn(write_fd)`` in a child; return (pid, read end of its pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn(w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _alive_backends(pg, pids) -> list[int]:  # type: ignore[no-untyped-def]
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        rows = admin.execute("select pid from pg_stat_activity where pid = any(%s)", (list(pids),)).fetchall()
    return [r[0] for r in rows]


@needs_claims
def test_worker_killed_mid_transaction_never_commits(make_broker, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists crash_t; create table crash_t (v int)")
    broker = make_broker("--max-size", "1")

    def child(w: int) -> None:
        conn = broker.connect()  # (settled: its transactions claim)
        conn.execute("insert into crash_t values (1)")
        os.write(w, str(conn.lease.backend_pid).encode())
        time.sleep(60)

    pid, r = _fork(child)
    victim = int(os.read(r, 32))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

    snap = broker.wait_for(
        lambda s: s.closed_by_reason["holder_exited"] == 1 and s.slots[0].state == SlotState.IDLE,
        what="the dead holder's backend replaced",
    )
    assert snap.slots[0].backend_pid != victim
    assert snap.slots[0].generation == 2
    with broker.connect() as conn:
        assert conn.execute("select count(*) from crash_t").fetchone() == (0,)
        assert conn.lease.backend_pid != victim
    deadline = time.monotonic() + 10
    while _alive_backends(pg, [victim]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive_backends(pg, [victim]) == []  # PostgreSQL ended (and rolled back) that session


@needs_claims
def test_worker_killed_while_a_large_result_streams(make_broker):
    broker = make_broker("--max-size", "1")

    def child(w: int) -> None:
        conn = broker.connect()  # (settled: its transactions claim)
        rows = conn.cursor().stream("select g, repeat('x', 500) from generate_series(1, 2000000) g")
        next(iter(rows))
        os.write(w, str(conn.lease.backend_pid).encode())
        time.sleep(60)  # the server keeps writing; the socket buffers fill up

    pid, r = _fork(child)
    victim = int(os.read(r, 32))
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    broker.wait_for(lambda s: s.slots[0].state == SlotState.IDLE, what="slot back")
    # The next holder must get its own answers, not the dead worker's unread rows.
    with broker.connect(autocommit=True) as conn:
        for i in range(20):
            assert conn.execute("select %s::int, 'mine'", (i,)).fetchone() == (i, "mine")
        assert broker.snapshot().slots[0].backend_pid != victim


@needs_claims
def test_pg_terminate_backend_of_a_leased_backend(broker, pg):
    conn = broker.connect()
    conn.execute("select 1")
    victim = conn.lease.backend_pid
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (victim,))
    with pytest.raises(psycopg.OperationalError, match="terminat"):
        conn.execute("select 1")
    assert conn.closed and conn.lease is None
    conn.close()
    broker.wait_for(
        lambda s: s.closed_by_reason["died_while_lent"] + s.closed_by_reason["client_reported_broken"] == 1,
        what="the terminated backend closed",
    )
    # (a fresh look: a snapshot reads the counters before the close reasons, so the one that first
    # saw the reason may have been taken between the broker's two writes)
    assert broker.snapshot().counters["backends_closed"] >= 1
    with broker.connect() as again:
        (pid,) = again.execute("select pg_backend_pid()").fetchone()
        assert pid != victim


@needs_claims
def test_idle_in_transaction_timeout_takes_the_backend_back(make_broker):
    broker = make_broker("--max-size", "1", "--idle-transaction-timeout", "0.5")
    conn = broker.connect()
    conn.execute("select 1")
    victim = conn.lease.backend_pid
    # The broker notices the hang-up itself, without the holder doing anything.
    broker.wait_for(lambda s: s.closed_by_reason["died_while_lent"] == 1, timeout=10,
                    what="backend taken back")  # fmt: skip
    # psycopg 3.3 raises IdleInTransactionSessionTimeout, 3.2 an OperationalError: same server text.
    with pytest.raises(psycopg.Error, match="terminating connection due to idle-in-transaction"):
        conn.execute("select 2")
    assert conn.closed and conn.lease is None  # as with any lost connection
    conn.close()
    with broker.connect() as other:  # the pool is back to full strength
        assert other.execute("select pg_backend_pid() <> %s", (victim,)).fetchone() == (True,)


def test_postgresql_restart_fails_clearly_then_heals(pg_private, short_tmp):
    broker = BrokerProcess(pg_private.dsn(), short_tmp, 6432, ["--max-size", "2"]).start()
    try:
        conn = broker.connect(autocommit=True)
        assert conn.execute("select 1").fetchone() == (1,)
        pg_private.stop()
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert isinstance(info.value, pgreuse.BackendUnavailable)
        assert "cannot reach PostgreSQL" in str(info.value)
        pg_private.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert conn.execute("select 2").fetchone() == (2,)
                break
            except pgreuse.BackendUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        # The same connection works again: it never held a dead backend.
        assert not conn.closed
        conn.close()
    finally:
        broker.stop()


def test_broker_sigterm_removes_its_files_and_backends(make_broker, pg):
    broker = make_broker("--max-size", "2", "--min-size", "2")
    snap = broker.wait_for(lambda s: s.count(SlotState.IDLE) == 2, what="two warm backends")
    pids = [s.backend_pid for s in snap.slots]
    assert broker.stop() == 0
    assert sorted(os.listdir(broker.socket_dir)) == [os.path.basename(broker.log_path)]
    deadline = time.monotonic() + 10
    while _alive_backends(pg, pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive_backends(pg, pids) == []


@needs_claims
def test_broker_killed_and_restarted(make_broker):
    broker = make_broker("--max-size", "1")
    conn = broker.connect(autocommit=True)
    assert conn.execute("select 1").fetchone() == (1,)
    idle = broker.connect(autocommit=True)  # parked at the old broker, not used until it is back
    broker.kill()
    # A claim looks at the control channel when the backend has idled longer than CHECK_AFTER_NS
    # (a backend given back a moment ago is used at once), and then sees the broker's end.
    time.sleep(CHECK_AFTER_NS / 1e9 * 2)
    with pytest.raises(pgreuse.BrokerUnavailable, match="broker"):
        conn.execute("select 1")
    assert conn.closed  # broken for good, like a connection whose server went away
    conn.close()
    broker.start()  # finds the stale socket files and replaces them
    with pytest.raises(pgreuse.BrokerUnavailable, match="stopped or restarted"):
        idle.execute("select 1")
    assert idle.closed
    idle.close()
    with broker.connect(autocommit=True) as fresh:
        assert fresh.execute("select 3").fetchone() == (3,)


def test_sigterm_waits_for_a_lease_to_come_back(make_broker, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists term_t; create table term_t (v int)")
    broker = make_broker("--max-size", "1", "--shutdown-timeout", "10")
    conn = broker.connect()
    other = broker.connect(autocommit=True)
    conn.execute("insert into term_t values (1)")
    broker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert broker.proc.poll() is None  # still waiting for our lease
    assert not os.path.exists(broker.control_socket)  # but accepting no one new
    with pytest.raises(pgreuse.PoolClosed, match="shutting down"):
        other.execute("select 1")  # and lending nothing new
    conn.commit()  # the holder finishes its transaction normally
    assert broker.proc.wait(10) == 0
    conn.close()
    other.close()
    with psycopg.connect(pg.dsn()) as admin:
        assert admin.execute("select count(*) from term_t").fetchone() == (1,)


def test_connect_while_postgresql_is_unreachable_names_the_reason(pg, short_tmp):
    dead = pg.tcp_dsn(port="1")  # nothing listens on port 1
    broker = BrokerProcess(dead, short_tmp, 6432).start()  # the broker itself starts and waits
    try:
        with pytest.raises(psycopg.OperationalError, match=r"cannot reach PostgreSQL.*127\.0\.0\.1:1"):
            broker.connect()
    finally:
        assert broker.stop() == 0


@needs_claims
def test_a_lease_held_past_max_lease_time_is_revoked(make_broker, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists revoke_t; create table revoke_t (v int)")
    broker = make_broker("--max-size", "1", "--max-lease-time", "0.5")
    stuck = broker.connect()
    stuck.execute("insert into revoke_t values (1)")  # and then the holder hangs
    victim = stuck.lease.backend_pid
    broker.wait_for(lambda s: s.closed_by_reason["revoked"] == 1, what="the lease revoked")
    with pytest.raises(psycopg.OperationalError):
        stuck.execute("select 1")
    assert stuck.closed
    stuck.close()
    with broker.connect(autocommit=True) as other:  # the pool is whole again
        assert other.execute("select count(*) from revoke_t").fetchone() == (0,)  # rolled back
        assert other.execute("select pg_backend_pid() <> %s", (victim,)).fetchone() == (True,)


@needs_claims
def test_a_restarted_broker_ends_the_dead_brokers_backends(make_broker, pg):
    # Every worker process holds copies of the backend sockets, which keep the backends connected
    # after their broker died: the next broker ends them (their pids are in the old table) before
    # it opens its own, so PostgreSQL never sees more than --max-size for long.
    broker = make_broker("--max-size", "2", "--min-size", "2")
    conn = broker.connect(autocommit=True)  # this process now holds both backends' sockets
    old = [
        s.backend_pid for s in broker.wait_for(lambda s: s.count(SlotState.IDLE) == 2, what="2 open").slots
    ]
    broker.kill()
    time.sleep(0.3)
    assert sorted(_alive_backends(pg, old)) == sorted(old)  # our copies keep them connected
    broker.start()
    deadline = time.monotonic() + 10
    while _alive_backends(pg, old) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive_backends(pg, old) == []
    assert "ended the previous broker's backends" in broker.log()
    conn.close()
    with broker.connect(autocommit=True) as fresh:
        assert fresh.execute("select 1").fetchone() == (1,)


@needs_claims
def test_a_killed_holders_running_statement_ends_with_it(make_broker, pg):
    # A holder SIGKILLed in the middle of a statement: its backend ends at PostgreSQL's next client
    # connection check (pgreuse sets client_connection_check_interval on its backends), so the row
    # it locked is free in a fraction of a second, not when the statement would have ended; and the
    # slot gets its new backend only once the old one is gone (PostgreSQL never sees two).
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists locked_t; create table locked_t (id int primary key, v int)")
        admin.execute("insert into locked_t values (1, 0)")
    broker = make_broker("--max-size", "1", "--min-size", "1")

    def child(w: int) -> None:
        conn = broker.connect()
        conn.execute("update locked_t set v = 1 where id = 1")  # holds the row lock
        os.write(w, str(conn.lease.backend_pid).encode())
        conn.execute("select pg_sleep(60)")

    pid, r = _fork(child)
    victim = int(os.read(r, 32))
    time.sleep(0.3)  # (inside pg_sleep)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    t0 = time.monotonic()
    with broker.connect(autocommit=True) as conn:
        conn.execute("update locked_t set v = 2 where id = 1")  # waits for the backend, then the lock
        waited = time.monotonic() - t0
        assert conn.execute("select v from locked_t").fetchone() == (2,)  # the dead one's never was
    assert waited < 5, f"the row stayed locked {waited:.1f}s after its holder died"
    assert _alive_backends(pg, [victim]) == []
    with broker.connect(autocommit=True) as conn:
        assert conn.execute("show client_connection_check_interval").fetchone() == ("500ms",)
