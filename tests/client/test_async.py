"""The asyncio connection: same lease rules as the sync one, on asyncio and on uvloop, with the C
hot path of the lease and without it."""

from __future__ import annotations

import asyncio
import os

import psycopg
import pytest
import uvloop

import pgreuse
from broker_process import CLAIMS, held
from pgreuse.wire.states import SlotState

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("lease_path")]


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request):  # type: ignore[no-untyped-def]
    if request.param == "uvloop":
        return ("asyncio", {"loop_factory": uvloop.new_event_loop})
    return "asyncio"


async def test_async_lease_per_transaction(broker):
    async with await pgreuse.connect_async(broker.conninfo) as conn:
        broker.settle()  # (the broker shares its backends with the workers a moment after they come)
        assert conn.lease is None
        async with conn.transaction():
            cur = await conn.execute("select pg_backend_pid()")
            (pid,) = await cur.fetchone()
            assert (conn.lease is not None) == CLAIMS and held(conn)
            assert conn.lease is None or conn.lease.backend_pid == pid
        assert conn.lease is None
        await conn.set_autocommit(True)
        cur = await conn.execute("select 2")
        assert await cur.fetchone() == (2,)
        assert conn.lease is None


async def test_many_tasks_share_two_backends(make_broker, pg):
    broker = make_broker("--max-size", "2")
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        await admin.execute("drop table if exists async_t; create table async_t (task int, n int)")

    async def task(i: int) -> set[int]:
        pids = set()
        async with await pgreuse.connect_async(broker.conninfo) as conn:
            for n in range(10):
                async with conn.transaction():
                    await conn.execute("insert into async_t values (%s, %s)", (i, n))
                    await asyncio.sleep(0)  # let other tasks run while we hold the backend
                    # claimed (conn.lease) or through the broker's proxy: a backend of the two
                    cur = await conn.execute("select pg_backend_pid()")
                    row = await cur.fetchone()
                    assert row is not None
                    assert conn.lease is None or conn.lease.backend_pid == row[0]
                    pids.add(row[0])
        return pids

    results = await asyncio.gather(*(task(i) for i in range(12)))
    assert len(set().union(*results)) <= 2
    async with await psycopg.AsyncConnection.connect(pg.dsn()) as admin:
        cur = await admin.execute("select count(*) from async_t")
        assert await cur.fetchone() == (120,)
    # The table's counters follow the proxy's leases within its lag (TABLE_LAG), not at once: a
    # slot may read "back" before the last leases are counted.
    broker.wait_for(
        lambda s: s.count(SlotState.LENT) == 0 and s.counters["leases"] >= 120,
        what="all back, and every transaction's lease counted",
    )


async def test_async_wait_timeout_and_cancellation(make_broker):
    broker = make_broker("--max-size", "1", "--wait-timeout", "0.5")
    holder = await pgreuse.connect_async(broker.conninfo)
    await holder.execute("select 1")  # holds the only backend
    other = await pgreuse.connect_async(broker.conninfo)
    with pytest.raises(pgreuse.PoolTimeout):
        await other.execute("select 1")

    # A task cancelled while it queues for a backend must not leak the grant that comes later.
    waiting = asyncio.ensure_future(other.execute("select 1"))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await holder.commit()
    third = await pgreuse.connect_async(broker.conninfo, autocommit=True)
    cur = await third.execute("select 3")
    assert await cur.fetchone() == (3,)
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="nothing leaked")
    for c in (holder, other, third):
        await c.close()


async def test_async_cancel_and_session_state(make_broker):
    broker = make_broker("--max-size", "1")
    async with await pgreuse.connect_async(broker.conninfo, autocommit=True) as conn:
        query = asyncio.ensure_future(conn.execute("select pg_sleep(20)"))
        await asyncio.sleep(0.3)
        conn.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await query
        await conn.execute("set search_path to pg_catalog")
        async with await pgreuse.connect_async(broker.conninfo, autocommit=True) as other:
            cur = await other.execute("show search_path")
            assert (await cur.fetchone())[0] != "pg_catalog"
        with pytest.raises(pgreuse.NotSupported, match="LISTEN"):
            await conn.execute("listen x")


async def test_async_refuses_to_run_in_a_forked_child(broker):
    conn = await pgreuse.connect_async(broker.conninfo, autocommit=True)
    await conn.execute("select 1")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # The child must not touch the parent's connection; it gets a clear error instead.
            coro = conn.execute("select 1")
            try:
                coro.send(None)
            except pgreuse.WrongProcess:
                code = 0
            except BaseException:
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    cur = await conn.execute("select 9")
    assert await cur.fetchone() == (9,)
    await conn.close()
