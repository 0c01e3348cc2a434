"""close() while a stream() iterator is alive: returns at once, like psycopg's, and loses no backend.

Issue 13: ``Connection.close()`` rolled back first, and psycopg's ``rollback()`` waits for the
connection lock, which the suspended ``stream()`` generator holds: close() never returned, and the
backend stayed leased meanwhile.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

import pgreuse
from broker_process import held
from pgreuse.wire.states import SlotState

QUERY = "select generate_series(1, 100000)"


def assert_pool_whole(broker) -> None:  # type: ignore[no-untyped-def]
    """The backend came back (or was replaced): a new connection is served, every slot idle."""
    with broker.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        conn.commit()
    broker.wait_for(lambda s: s.count(SlotState.IDLE) == 1, what="the pool at full strength")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("autocommit", [False, True])
def test_close_while_a_stream_is_alive(make_broker, autocommit):
    b = make_broker("--max-size", "1")
    conn = b.connect(autocommit=autocommit)
    rows = conn.cursor().stream(QUERY)
    assert next(rows) == (1,)
    assert held(conn)  # a stream keeps its lease between rows
    started = time.monotonic()
    conn.close()  # used to wait forever for the lock the generator holds
    assert time.monotonic() - started < 5
    assert conn.closed
    rows.close()  # the generator ends quietly on the closed connection
    assert_pool_whole(b)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_async_close_while_a_stream_is_alive(make_broker, loop):
    b = make_broker("--max-size", "1")

    async def main() -> None:
        conn = await pgreuse.connect_async(b.conninfo)
        rows = conn.cursor().stream(QUERY)
        assert await anext(rows) == (1,)
        assert held(conn)
        await asyncio.wait_for(conn.close(), 5)
        assert conn.closed
        await rows.aclose()

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None)
    with runner:
        runner.run(main())
    assert_pool_whole(b)
