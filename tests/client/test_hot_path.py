"""The C hot path of the lease (``pgreuse._slots.Hot``) against the Python path, its reference.

The hot path takes only the usual case (a fresh idle slot; a clean end) and hands everything else
to the Python path unchanged. The same script of statements runs on a connection with it and on one
without it, on a pool of one backend; what a user and the broker see after each step must be the
same: the result, whether a backend is held, the parameters libpq reports, the pool's
reset count, and the backend's session state as the next holder finds it.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgreuse
from broker_process import needs_claims
from pgreuse.client import hot
from pgreuse.client.claims import CHECK_AFTER_NS
from pgreuse.wire.states import SlotState

pytestmark = needs_claims


def _terminated_while_idle(c: Any) -> Any:
    """PostgreSQL ends the idle backend (a restart, an admin's terminate); the next statement, later
    than CHECK_AFTER_NS, finds out before it uses it, and runs on a new one."""
    (pid,) = c.execute("select pg_backend_pid()").fetchone()
    with psycopg.connect(DSN[0], autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s, 5000)", (pid,))  # (waits for its end)
    # Longer than CHECK_AFTER_NS, shorter than the broker's look at its idle backends: the
    # statement's claim is the first to find it gone.
    time.sleep(CHECK_AFTER_NS / 1e9 * 1.5)
    (new,) = c.execute("select pg_backend_pid()").fetchone()
    return new != pid


DSN = [""]


def _pipeline(c: Any) -> Any:
    with c.pipeline():
        a = c.execute("select 5")
        b = c.execute("select 6")
    return (a.fetchone(), b.fetchone())


ADVISORY_LOCKS = "select count(*) from pg_locks where locktype = 'advisory'"
HOT_TEMP_TABLE = "select count(*) from pg_class where relname = 'hot_t'"
STEPS: list[tuple[str, Any]] = [
    ("select", lambda c: c.execute("select 1").fetchone()),
    ("set timezone", lambda c: c.execute("set time zone 'America/New_York'")),
    ("after set timezone", lambda c: c.execute("show timezone").fetchone()),
    ("set search_path", lambda c: c.execute("set search_path to pg_catalog")),
    ("after search_path", lambda c: c.execute("show search_path").fetchone()),
    ("temp table", lambda c: c.execute("create temp table hot_t (x int)")),
    ("after temp table", lambda c: c.execute(HOT_TEMP_TABLE).fetchone()),
    ("error", lambda c: c.execute("select 1/0")),
    ("after error", lambda c: c.execute("select 2").fetchone()),
    ("autocommit off (no backend)", lambda c: setattr(c, "autocommit", False)),
    ("in transaction", lambda c: c.execute("select 3").fetchone()),
    ("second statement", lambda c: c.execute("select 4").fetchone()),
    ("commit", lambda c: c.commit()),
    ("autocommit on", lambda c: setattr(c, "autocommit", True)),
    ("pipeline", _pipeline),
    # A function that changes a reported parameter: the statement looks clean, only the parameters
    # libpq reports at its end show the change (and they are put back).
    ("parameter in a function", lambda c: c.execute("select hot_tz()").fetchone()),
    ("after the function", lambda c: c.execute("show timezone").fetchone()),
    ("terminated while idle", _terminated_while_idle),
    ("advisory lock", lambda c: c.execute("select pg_advisory_lock(42)").fetchone()),
    ("after advisory lock", lambda c: c.execute(ADVISORY_LOCKS).fetchone()),
    ("terminated", lambda c: c.execute("select pg_terminate_backend(pg_backend_pid())")),
]


def _run(broker: Any, path: str) -> list[tuple[Any, ...]]:
    """Run STEPS on a new connection; what is seen after each."""
    out: list[tuple[Any, ...]] = []
    resets = broker.snapshot().counters["resets"]
    DSN[0] = broker.dsn
    with psycopg.connect(broker.dsn, autocommit=True) as admin:
        admin.execute(
            "create or replace function hot_tz() returns text language sql as "
            "$$ select set_config('TimeZone', 'Asia/Tokyo', false) $$"
        )
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 0")  # (the first claim: this process reads the pool's fds)
        if path == "python":
            conn._hot = hot.COLD
        else:
            assert conn._hot is not hot.COLD
        for name, step in STEPS:
            try:
                result: Any = step(conn)
                if isinstance(result, psycopg.Cursor):
                    result = result.statusmessage
            except psycopg.Error as exc:
                result = type(exc).__name__
            held = conn.lease is not None
            # The broker settles a dirty or broken end on its own time (a reset, a new backend):
            # wait until the pool's one backend is idle again, unless this connection holds it.
            broker.wait_for(lambda s, held=held: held or s.count(SlotState.IDLE) == 1, what=f"after {name}")
            params = (conn.info.parameter_status("TimeZone"), conn.info.parameter_status("search_path"))
            out.append(
                (
                    name,
                    result,
                    held,
                    conn.closed,
                    params,
                )
            )
            if conn.closed:
                break
    # The broker's DISCARD ALLs (its counters lag a statement's end: counted over the whole run).
    broker.wait_for(lambda s: s.count(SlotState.IDLE) == 1, what="the run settled")
    out.append(("resets", broker.snapshot().counters["resets"] - resets))
    return out


def test_the_hot_path_does_what_the_python_path_does(make_broker):
    broker = make_broker("--max-size", "1")
    c_path = _run(broker, "c")
    broker.wait_for(lambda s: s.count(SlotState.IDLE) == 1, what="a backend again")
    python_path = _run(broker, "python")
    assert c_path == python_path
    # (and the script reached its end: the backend was terminated under the last step)
    assert c_path[-2][0] == "terminated"


def test_the_hot_path_takes_the_usual_statement(broker, monkeypatch):
    """The hot path is not bypassed in the usual case: a clean select on a fresh slot never runs
    the Python path's claim or give-back."""
    # (A slot not given back here for CHECK_AFTER_NS is checked in Python first: a busy machine
    # may space two statements that far apart.)
    monkeypatch.setattr(hot, "CHECK_AFTER_NS", 10**10)
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 1")
        broker.settle()
        conn.execute("select 1")
        calls: list[str] = []
        begin, done = conn._begin, conn._after_wait_done
        monkeypatch.setattr(conn, "_begin", lambda *a: calls.append("begin") or begin(*a))
        monkeypatch.setattr(conn, "_after_wait_done", lambda: calls.append("end") or done())
        for _ in range(5):
            assert conn.execute("select 2").fetchone() == (2,)
        assert calls == []
        assert conn.lease is None


@pytest.mark.anyio
async def test_the_async_connection_takes_the_hot_path_too(broker, monkeypatch):
    monkeypatch.setattr(hot, "CHECK_AFTER_NS", 10**10)  # (as above)
    async with await pgreuse.connect_async(broker.conninfo, autocommit=True) as conn:
        await conn.execute("select 1")
        broker.settle()  # (an async transaction that finds nothing idle goes through the proxy)
        await conn.execute("select 1")
        calls: list[str] = []
        begin, done = conn._begin, conn._after_wait_done
        monkeypatch.setattr(conn, "_begin", lambda *a: calls.append("begin") or begin(*a))
        monkeypatch.setattr(conn, "_after_wait_done", lambda: calls.append("end") or done())
        for _ in range(5):
            cur = await conn.execute("select 2")
            assert await cur.fetchone() == (2,)
        assert calls == []
        assert conn.lease is None
