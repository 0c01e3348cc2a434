"""Proxy mode against a real broker and PostgreSQL: psql and plain psycopg as clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import psycopg
import pytest

from pgreuse.wire import frames
from pgreuse.wire.states import SlotState
from raw_client import RawClient

PSQL = "/usr/bin/psql"


def plain(broker, **kwargs) -> psycopg.Connection:  # type: ignore[no-untyped-def, type-arg]
    """A plain psycopg connection to the broker: a proxied client, like any non-pgreuse app."""
    return psycopg.connect(broker.conninfo, **kwargs)


def psql(
    broker, *commands: str, db: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    args = [PSQL, "-X", "-h", broker.socket_dir, "-p", str(broker.port), "-d", broker.dbname]
    for c in commands:
        args += ["-c", c]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check, env=env)


def startup_error(path: str, dbname: str) -> dict[str, str]:
    """Send a StartupMessage to the broker socket and return the ErrorResponse fields it answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(frames.startup_message({"user": "postgres", "database": dbname}))
        reader = frames.FrameReader()
        while True:
            msg = reader.next_message()
            if msg is None:
                data = s.recv(65536)
                assert data, "broker closed the socket without an ErrorResponse"
                reader.feed(data)
                continue
            if msg.type == b"E":
                return frames.parse_error_fields(msg.body)
            assert msg.type != b"Z", "startup succeeded"


def test_psql_statements_errors_and_copy(broker, pg, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"{i}\t{'x' * i}\n" for i in range(200)))
    dst = tmp_path / "out.txt"
    out = psql(
        broker,
        "drop table if exists proxy_copy; create table proxy_copy (i int, s text)",
        f"\\copy proxy_copy from '{src}'",
        "begin",
        "insert into proxy_copy values (-1, 'rolled back')",
        "select 1/0",
        "select 2",
        "rollback",
        f"\\copy (select * from proxy_copy order by i) to '{dst}'",
        "select count(*), sum(i) from proxy_copy",
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "division by zero" in out.stderr
    assert "current transaction is aborted" in out.stderr
    assert "COPY 200" in out.stdout
    assert " 200 | 19900" in out.stdout
    assert dst.read_text() == src.read_text()
    snap = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="leases returned")
    assert snap.counters["protocol_errors"] == 0


def test_extended_protocol_pipeline_and_binary(broker):
    with plain(broker, autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        assert cur.execute("select %s::int + 1, %s::text", (41, "é")).fetchone() == (42, "é")
        with conn.pipeline():
            curs = [conn.execute("select %s::int * 2", (i,)) for i in range(20)]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(20)]  # type: ignore[index]
        with conn.transaction():
            a = conn.execute("select pg_backend_pid()").fetchone()
            conn.execute("select pg_sleep(0.01)")
            b = conn.execute("select pg_backend_pid()").fetchone()
            assert a == b  # one backend for the whole transaction
        with conn.cursor().copy("copy (select generate_series(1, 1000)) to stdout") as copy:
            rows = list(copy.rows())
        assert len(rows) == 1000
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="leases returned")


def test_transactions_share_backends(make_broker):
    b = make_broker("--max-size", "1")
    conns = [plain(b, autocommit=True) for _ in range(5)]
    try:
        pids = {c.execute("select pg_backend_pid()").fetchone() for c in conns}
        assert len(pids) == 1  # five clients, one backend
    finally:
        for c in conns:
            c.close()


def test_set_marks_the_backend_dirty_and_it_is_reset(make_broker):
    b = make_broker("--max-size", "1")
    with plain(b, autocommit=True) as a:
        a.execute("set application_name = 'leaky'")
    with plain(b, autocommit=True) as other:
        (name,) = other.execute("show application_name").fetchone()  # type: ignore[misc]
    assert name != "leaky"
    b.wait_for(lambda s: s.slots[0].state is SlotState.IDLE, what="the reset backend idle again")


def test_session_mode_keeps_the_backend_and_resets_it(make_broker):
    b = make_broker("--max-size", "2", "--pool-mode", "session")
    with plain(b, autocommit=True) as a:
        a.execute("set myapp.flag = 'on'")
        (pid1,) = a.execute("select pg_backend_pid()").fetchone()  # type: ignore[misc]
        time.sleep(0.05)
        (pid2,) = a.execute("select pg_backend_pid()").fetchone()  # type: ignore[misc]
        assert pid1 == pid2
        assert a.execute("select current_setting('myapp.flag')").fetchone() == ("on",)
    b.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="session backend returned")
    for _ in range(3):
        with plain(b, autocommit=True) as c:
            (flag,) = c.execute("select current_setting('myapp.flag', true)").fetchone()  # type: ignore[misc]
            assert flag in (None, "")


def test_session_mode_resets_a_backend_whose_client_left_before_the_answer(make_broker):
    # Query and Terminate in one write (a driver closing while its last query runs, a forked child
    # on a shared socket): the answer's ReadyForQuery gives the backend back, and the session's
    # state must go with a reset, not to the next client.
    b = make_broker("--max-size", "1", "--pool-mode", "session")
    raw = RawClient(b)
    raw.sock.sendall(frames.query("set search_path to leaked_schema"))
    raw.until_ready(1)
    raw.sock.sendall(frames.query("select pg_sleep(0.2)") + frames.terminate())
    b.wait_for(lambda snap: snap.counters["resets"] >= 1, what="the backend reset after the client left")
    raw.close()
    with plain(b, autocommit=True) as c:
        (search_path,) = c.execute("show search_path").fetchone()  # type: ignore[misc]
    assert "leaked_schema" not in search_path


def test_a_query_pipelined_with_terminate_still_runs(make_broker, pg):
    # A client that writes its last statement and Terminate together: against PostgreSQL the
    # statement runs. The broker must not drop it for the Terminate behind it, whether a backend is
    # free at once (the client hangs up without reading the answer) or only after a wait (the
    # client reads the answer: a client that leaves while still queued is dropped, as by PgBouncer).
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists fire_and_forget; create table fire_and_forget (v int)")
    b = make_broker("--max-size", "1")
    for v in (1, 2):
        holder = plain(b) if v == 2 else None  # the second time the client has to wait its turn
        if holder is not None:
            holder.execute("select 1")  # an open transaction holds the only backend
        raw = RawClient(b)
        raw.sock.sendall(frames.query(f"insert into fire_and_forget values ({v})") + frames.terminate())
        if holder is not None:
            time.sleep(0.2)  # the insert waits for the backend
            holder.commit()
            holder.close()
            raw.until_ready(1)
        raw.close()
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        rows = admin.execute("select v from fire_and_forget order by v").fetchall()
    assert rows == [(1,), (2,)]


def test_wait_timeout_answers_with_an_error_and_the_broker_stays_healthy(make_broker):
    b = make_broker("--max-size", "1", "--wait-timeout", "0.5")
    holder = plain(b)
    holder.execute("select 1")  # transaction open: holds the only backend
    try:
        with plain(b, autocommit=True) as waiter:
            t0 = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="query_wait_timeout") as info:
                waiter.execute("select 1")
            assert info.value.sqlstate == "08P01"
            assert 0.4 < time.monotonic() - t0 < 5
            holder.commit()
            # The same client goes on once a backend is free again.
            assert waiter.execute("select 2").fetchone() == (2,)
    finally:
        holder.close()
    with plain(b, autocommit=True) as fresh:
        assert fresh.execute("select 3").fetchone() == (3,)
    assert b.snapshot().counters["timeouts"] == 1


def test_max_client_conn_answers_53300(make_broker):
    b = make_broker("--max-client-conn", "2")
    path = os.path.join(b.socket_dir, f".s.PGSQL.{b.port}")
    c1, c2 = plain(b), plain(b)
    try:
        fields = startup_error(path, b.dbname)
        assert fields["C"] == "53300"
        assert "max_client_conn" in fields["M"]
        assert "--max-client-conn is 2" in fields["M"]
    finally:
        c1.close()
    # Room again, once the broker has read c1's goodbye (it may accept the next one first).
    deadline = time.monotonic() + 5
    while True:
        try:
            c3 = plain(b, autocommit=True)
            break
        except psycopg.OperationalError as exc:
            if "max_client_conn" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with c3:
        assert c3.execute("select 1").fetchone() == (1,)
    c2.close()


def test_killed_client_mid_transaction_never_commits(broker, pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists proxy_kill; create table proxy_kill (v int)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.Popen(
        [PSQL, "-X", "-h", broker.socket_dir, "-p", str(broker.port), "-d", broker.dbname],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"begin;\ninsert into proxy_kill values (1);\n")
    proc.stdin.flush()
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = admin.execute(
                "select count(*) from pg_stat_activity where state = 'idle in transaction' "
                "and query like 'insert into proxy_kill%'"
            ).fetchone()
            if row == (1,):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the proxied transaction never started")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()  # reaps it and closes the pipes
        broker.wait_for(
            lambda s: s.closed_by_reason["client_reported_broken"] >= 1 and not s.count(SlotState.LENT),
            what="the backend of the killed client closed",
        )
        assert admin.execute("select count(*) from proxy_kill").fetchone() == (0,)
    with plain(broker, autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_cancel_reaches_the_proxied_query(broker):
    with plain(broker) as conn:
        timer = threading.Timer(0.3, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        assert time.monotonic() - t0 < 5
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)


def test_backend_killed_mid_transaction_closes_the_client(broker, pg):
    conn = plain(broker)
    try:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()  # type: ignore[misc]
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="dead backend replaced")
    with plain(broker, autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_pgreuse_handoff_and_proxy_clients_share_the_pool(broker):
    with broker.connect(autocommit=True) as handoff, plain(broker, autocommit=True) as proxied:
        for i in range(5):
            assert handoff.execute("select %s::int", (i,)).fetchone() == (i,)
            assert proxied.execute("select %s::int", (i,)).fetchone() == (i,)


def test_tcp_listener(make_broker):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = make_broker("--listen-addr", f"127.0.0.1:{port}")
    with psycopg.connect(
        f"host=127.0.0.1 port={port} dbname={b.dbname} user=postgres sslmode=prefer", autocommit=True
    ) as conn:
        assert conn.execute("select 7").fetchone() == (7,)
    # TCP peers cannot be identified: the admin console (PAUSE, SHUTDOWN) is Unix-socket only.
    with pytest.raises(psycopg.OperationalError, match="admin console is not served over TCP"):
        psycopg.connect(f"host=127.0.0.1 port={port} dbname=pgreuse user=postgres sslmode=disable")
    assert b.proc.poll() is None


def test_listen_addr_refuses_non_loopback(pg, short_tmp):
    from broker_process import BrokerProcess  # noqa: PLC0415

    b = BrokerProcess(pg.dsn(), short_tmp, 6432, ["--listen-addr", "0.0.0.0:6543"])
    with pytest.raises(RuntimeError, match="loopback"):
        b.start()


def test_a_proxied_client_is_told_the_pools_parameters_after_a_set(make_broker):
    # Transaction mode loses a session SET at commit; the client's driver must not keep believing it.
    b = make_broker("--max-size", "1")
    with plain(b, autocommit=True) as conn:
        pool_tz = conn.info.timezone.key
        conn.execute("set time zone 'Asia/Tokyo'")
        assert conn.execute("show timezone").fetchone() == (pool_tz,)
        assert conn.info.timezone.key == pool_tz
