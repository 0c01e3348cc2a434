"""The proxy's fast path against a real broker and PostgreSQL: what its shortcuts must not break.

The hot path keeps a backend registered with the loop while it moves between the pool's idle watch
and proxy sessions (only a callback changes), shares one receive buffer between sessions, and arms
one expiry timer for all waiters. Each test here would fail if one of those shortcuts lost a byte, a
hang-up or a deadline. (The same path in process, with no server: test_proxy_hot_path_inproc.py.)
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

import psycopg
import pytest

from pgreuse.broker import pool as pool_module
from pgreuse.broker import proxy
from pgreuse.wire import frames
from pgreuse.wire.states import SlotState
from raw_client import RawClient


def plain(broker, **kwargs) -> psycopg.Connection:  # type: ignore[no-untyped-def, type-arg]
    # A plain psycopg connection (a proxied client); no named prepared statements in transaction mode.
    return psycopg.connect(broker.conninfo, prepare_threshold=None, **kwargs)


def test_results_and_parameters_larger_than_the_receive_buffer(make_broker):
    # 2 MB of rows in one result, and a 3 MB parameter: both span many reads (the buffer is 256 KiB),
    # with message headers cut at arbitrary places. Two sessions alternate on one backend.
    b = make_broker("--max-size", "1")
    big = "".join(chr(0x41 + i % 26) for i in range(3_000_000))
    with plain(b, autocommit=True) as c1, plain(b, autocommit=True) as c2:
        for conn in (c1, c2, c1):
            sql = "select i, repeat(md5(i::text), 32) from generate_series(1, 2000) i"
            rows = conn.execute(sql).fetchall()
            assert len(rows) == 2000
            assert rows[1999] == (2000, hashlib.md5(b"2000").hexdigest() * 32)
            got = conn.execute("select length(%s::text), md5(%s::text)", (big, big)).fetchone()
            assert got == (len(big), hashlib.md5(big.encode()).hexdigest())
    snap = b.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="leases returned")
    assert snap.counters["protocol_errors"] == 0
    assert sum(snap.closed_by_reason.values()) == 0  # the backend was never lost on the way


def test_a_backend_that_dies_while_idle_after_proxying_is_noticed(make_broker, pg):
    # After a proxied transaction the backend's socket stays registered with the loop and only its
    # callback goes back to the pool's idle watch: that watch must still see the backend hang up.
    b = make_broker("--max-size", "1", "--min-size", "1")
    with plain(b, autocommit=True) as conn:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()  # type: ignore[misc]
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        # No client does anything: only the idle watch can notice.
        snap = b.wait_for(
            lambda s: s.closed_by_reason["server_closed"] >= 1 and s.count(SlotState.IDLE) == 1,
            what="the idle backend's hang-up noticed and the slot refilled",
        )
        assert snap.slots[0].backend_pid != pid
        # The same client carries on with the replacement.
        assert conn.execute("select pg_backend_pid()").fetchone() != (pid,)


def test_proxy_and_handoff_take_turns_on_one_backend(make_broker):
    # The backend's loop registration goes proxy -> idle watch -> removed (a worker reads the fd) ->
    # idle watch -> proxy: every turn must get its own answers and leave nothing behind.
    b = make_broker("--max-size", "1")
    with b.connect(autocommit=True) as handoff, plain(b, autocommit=True) as proxied:
        for i in range(30):
            assert proxied.execute("select %s::int, pg_backend_pid()", (i,)).fetchone()[0] == i  # type: ignore[index]
            assert handoff.execute("select %s::int + 1000", (i,)).fetchone() == (i + 1000,)
    # (the proxy's lease counts reach the table in batches, pool.TABLE_LAG)
    snap = b.wait_for(
        lambda s: s.count(SlotState.LENT) == 0 and s.counters["leases"] >= 60, what="leases returned"
    )
    assert sum(snap.closed_by_reason.values()) == 0


def test_each_waiter_gets_its_own_deadline(make_broker):
    # One timer serves every waiter: a request queued later must not time out with the first one,
    # and a request served before its deadline must not be denied.
    b = make_broker("--max-size", "1", "--wait-timeout", "3")
    holder = plain(b)
    holder.execute("select 1")  # holds the only backend in an open transaction
    outcomes: dict[str, tuple[str, float]] = {}

    def wait(name: str, delay: float) -> None:
        time.sleep(delay)
        with plain(b, autocommit=True) as conn:
            t0 = time.monotonic()
            try:
                conn.execute("select 1")
                outcomes[name] = ("ok", time.monotonic() - t0)
            except psycopg.OperationalError as exc:
                outcomes[name] = (str(exc.sqlstate), time.monotonic() - t0)

    first = threading.Thread(target=wait, args=("first", 0.0))
    second = threading.Thread(target=wait, args=("second", 1.5))
    first.start()
    second.start()
    first.join(10)
    # The first timed out; the second has waited about 1.5 s of its 3 s: serve it now.
    assert outcomes["first"][0] == "08P01"
    assert 2.8 < outcomes["first"][1] < 6
    assert "second" not in outcomes
    holder.commit()
    second.join(10)
    assert outcomes["second"][0] == "ok"
    holder.close()
    assert b.snapshot().counters["timeouts"] == 1


@pytest.mark.parametrize("clients", [8])
def test_many_clients_on_few_backends_lose_nothing(make_broker, pg, clients):
    # Every release goes straight to the next waiter (no idle step): count every row.
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists hot_path_rows; create table hot_path_rows (c int, i int)")
    b = make_broker("--max-size", "2")
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with plain(b) as conn:
                for i in range(50):
                    conn.execute("insert into hot_path_rows values (%s, %s)", (n, i))
                    conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        assert admin.execute("select count(*), count(distinct (c, i)) from hot_path_rows").fetchone() == (
            clients * 50,
            clients * 50,
        )
    # (The table lags the pool by up to pool.TABLE_LAG: wait for the whole final state at once.)
    snap = b.wait_for(
        lambda s: s.count(SlotState.LENT) == 0 and s.counters["pending"] == 0, what="leases returned"
    )
    assert snap.counters["waits"] > 0  # the run did queue, so handoffs went waiter to waiter


def test_reset_every_lease_through_the_proxy(make_broker):
    # A clean give-back leaves the backend registered with the loop; a reset must not inherit that
    # registration (the reset reads the socket itself, and the next lease must see its answers).
    b = make_broker("--max-size", "1", "--reset-every-lease", "--wait-timeout", "3")
    with plain(b, autocommit=True) as conn:
        conn.execute("set statement_timeout = '4s'")
        for i in range(5):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    # Six leases (the SET and five queries), each reset before the next: the last reset ends with
    # the backend idle. (The slot record alone may show IDLE from an earlier reset: proxy leases
    # reach the table up to pool.TABLE_LAG late.)
    snap = b.wait_for(
        lambda s: s.counters["resets"] >= 6 and s.count(SlotState.IDLE) == 1, what="the sixth reset"
    )
    assert sum(snap.closed_by_reason.values()) == 0


# -- raw protocol clients (RawClient): what a pipelining client (libpq pipeline mode, several Query
# -- messages in one write) does, which psycopg's blocking API cannot show -----------------------------


def test_a_pipelining_client_that_times_out_does_not_delay_other_waiters(make_broker):
    # A timed-out client with a second query queued asks again at once, from inside the expiry
    # pass: the timer must still fire for the other waiter's own, earlier deadline.
    b = make_broker("--max-size", "1", "--wait-timeout", "2")
    holder = plain(b)
    holder.execute("select 1")  # holds the only backend in an open transaction
    pipelining, other = RawClient(b), RawClient(b)
    try:
        pipelining.sock.sendall(frames.frame(b"Q", b"select 1\0") + frames.frame(b"Q", b"select 2\0"))
        time.sleep(0.5)
        t0 = time.monotonic()
        other.sock.sendall(frames.frame(b"Q", b"select 3\0"))
        answer = other.until_ready(1)
        waited = time.monotonic() - t0
        assert [t for t, _ in answer] == [b"E", b"Z"]
        # (Before the fix: about 3.5 s, the other client's second deadline.)
        assert 1.8 < waited < 3.2, f"denied after {waited:.2f}s; --wait-timeout is 2s"
    finally:
        holder.close()
        pipelining.close()
        other.close()


def test_hundreds_of_pipelined_queries_refused_at_once(make_broker):
    # Each refusal is answered, then the next query asks again: that must not recurse per query.
    b = make_broker("--max-size", "1", "--max-waiting", "1", "--wait-timeout", "10")
    holder = plain(b)
    holder.execute("select 1")  # holds the only backend
    queued = RawClient(b)
    queued.sock.sendall(frames.frame(b"Q", b"select 1\0"))  # takes the one waiting place
    b.wait_for(lambda s: s.counters["pending"] == 1, what="one waiter")
    flood = RawClient(b)
    try:
        flood.sock.sendall(frames.frame(b"Q", b"select 2\0") * 1500)
        answers = flood.until_ready(1500)
        errors = [body for t, body in answers if t == b"E"]
        assert len(errors) == 1500
        assert b"53300" in errors[0] and b"--max-waiting" in errors[-1]
        holder.commit()
        assert [t for t, _ in queued.until_ready(1)][-1] == b"Z"
        flood.sock.sendall(frames.frame(b"Q", b"select 3\0"))  # the flooding client carries on
        assert [t for t, _ in flood.until_ready(1)] == [b"T", b"D", b"C", b"Z"]
    finally:
        holder.close()
        queued.close()
        flood.close()
    assert b.proc.poll() is None


def test_session_mode_takes_a_parse_header_cut_from_its_body(make_broker):
    b = make_broker("--pool-mode", "session")
    raw = RawClient(b)
    try:
        parse = frames.frame(b"P", b"stmt\0select 41 + 1\0\0\0")
        rest = (
            parse[5:]
            + frames.frame(b"B", b"\0stmt\0\0\0\0\0\0\0")
            + frames.frame(b"E", b"\0\0\0\0\0")
            + frames.frame(b"S", b"")
        )
        raw.sock.sendall(parse[:5])  # a read that ends right after the Parse header
        time.sleep(0.3)
        raw.sock.sendall(rest)
        answer = raw.until_ready(1)
        assert [t for t, _ in answer] == [b"1", b"2", b"D", b"C", b"Z"]
        assert answer[2][1].endswith(b"42")
    finally:
        raw.close()
    assert b.proc.poll() is None


def test_the_table_catches_up_with_every_proxied_lease(make_broker):
    # Proxy leases reach the shared-memory table in batches (pool.TABLE_LAG): none may be lost on
    # the way, whether the backend went idle in between or straight to the next waiter.
    b = make_broker("--max-size", "1")
    before = b.snapshot()
    per_client, clients = 40, 3
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with plain(b, autocommit=True) as conn:
                for i in range(per_client):
                    assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    expected = before.counters["leases"] + per_client * clients
    snap = b.wait_for(
        lambda s: s.counters["leases"] >= expected and s.slots[0].state is SlotState.IDLE,
        what="every lease in the table",
    )
    c = snap.counters
    assert c["leases"] == expected  # exactly one lease per autocommit statement
    assert c["waits"] > before.counters["waits"]  # three clients on one backend did queue
    assert sum(snap.wait_histogram) == c["leases"]
    assert c["use_ns"] > before.counters["use_ns"] and c["pending"] == 0
    slot = snap.slots[0]
    assert (slot.leases, slot.holder_pid) == (expected, 0)


def test_the_broker_runs_the_expected_scanner_and_session_core(make_broker):
    # nox runs the proxy tests once on the C scanners and session core and once on the Python ones:
    # prove the broker under test runs what its matrix leg is about (the environment reaches its
    # process).
    expected = os.environ.get("PGREUSE_EXPECT_SCAN")
    if expected is None:
        pytest.skip("PGREUSE_EXPECT_SCAN not set (nox sets it per matrix leg)")
    b = make_broker("--max-size", "1")
    deadline = time.monotonic() + 10
    while "proxy scanner:" not in b.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"proxy scanner: {expected}, session core: {expected}" in b.log()


def test_the_pool_fields_are_c_exactly_when_the_session_core_is():
    # The C lending path reads the pool's and backends' fields as C struct members: with Python
    # ones it would silently never run (and with the Python session core, nothing reads them in C).
    c_core = proxy.CORE == "c"
    assert c_core is pool_module.C_FIELDS
    if "PGREUSE_EXPECT_SCAN" in os.environ:
        assert c_core is (os.environ["PGREUSE_EXPECT_SCAN"] == "c")


def test_a_worker_lease_reaches_the_table_without_further_traffic(make_broker):
    # Handoff leases are not batched like the proxy's: the end of the last lease before the pool
    # goes quiet must reach the table too, with nothing after it to carry it there.
    b = make_broker("--max-size", "1")
    with b.connect(autocommit=True) as conn:
        conn.execute("select pg_sleep(0.05)")
    snap = b.wait_for(
        lambda s: s.counters["use_ns"] >= 50_000_000 and s.count(SlotState.LENT) == 0,
        what="the lease's 50 ms of use in the table",
    )
    assert snap.counters["leases"] == 1


def test_an_empty_parse_queued_behind_a_refusal_is_answered_like_a_server(make_broker):
    # A Parse with no body (length 4) followed by half a Sync header, queued while the only
    # backend is held; the request then times out. The refusal replays what was queued: the
    # empty Parse must replay as the whole message it is, and the cut Sync must survive.
    b = make_broker("--max-size", "1", "--wait-timeout", "0.5")
    holder = plain(b)
    holder.execute("select 1")  # holds the only backend in an open transaction
    raw = RawClient(b)
    try:
        sync = frames.frame(b"S", b"")
        raw.sock.sendall(frames.frame(b"P", b"") + sync[:2])
        time.sleep(1.0)  # past the wait timeout
        raw.sock.sendall(sync[2:])
        answer = raw.until_ready(1)
        assert [t for t, _ in answer] == [b"E", b"Z"]
        assert b"query_wait_timeout" in answer[0][1]
        # The session goes on: the next query runs once the backend is free.
        holder.commit()
        raw.sock.sendall(frames.frame(b"Q", b"select 7\0"))
        assert [t for t, _ in raw.until_ready(1)] == [b"T", b"D", b"C", b"Z"]
    finally:
        raw.close()
        holder.close()
    assert b.proc.poll() is None
