"""The psycopg_pool drop-in: same API, same errors, pgreuse connections."""

from __future__ import annotations

import threading

import psycopg_pool
import pytest

import pgreuse
from pgreuse.client.psycopg_version import check
from pgreuse.wire.states import SlotState

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():  # type: ignore[no-untyped-def]
    return "asyncio"


def test_pool_hands_out_pgreuse_connections(make_broker):
    broker = make_broker("--max-size", "2")
    with pgreuse.ConnectionPool(broker.conninfo, min_size=2, max_size=6, name="web", open=True) as pool:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(10):
                    with pool.connection() as conn:
                        assert isinstance(conn, pgreuse.Connection)
                        conn.execute("select pg_sleep(0.001)")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        stats = pool.get_stats()
        assert stats["pool_max"] == 6 and stats["requests_num"] == 60
    # Six pooled connections, yet never more than two backends.
    snap = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="all back")
    assert sum(1 for s in snap.slots if s.state != SlotState.CLOSED) <= 2


def test_broker_timeouts_are_psycopg_pool_errors(make_broker):
    broker = make_broker("--max-size", "1", "--wait-timeout", "0.3")
    with (
        pgreuse.ConnectionPool(broker.conninfo, min_size=2, max_size=2, open=True) as pool,
        pool.connection() as holder,
    ):
        holder.execute("select 1")  # holds the only backend
        with pool.connection() as other, pytest.raises(psycopg_pool.PoolTimeout):
            other.execute("select 1")  # the existing except clause still catches it


def test_pool_refuses_what_cannot_work():
    with pytest.raises(pgreuse.NotSupported, match="prepare_threshold=0"):
        pgreuse.ConnectionPool("host=/tmp port=1", kwargs={"prepare_threshold": 0}, open=False)
    with pytest.raises(TypeError, match=r"pgreuse\.client\.connection\.Connection"):
        pgreuse.ConnectionPool("host=/tmp port=1", connection_class=object, open=False)  # type: ignore[arg-type]


async def test_async_pool(make_broker):
    broker = make_broker("--max-size", "1")
    async with pgreuse.AsyncConnectionPool(broker.conninfo, min_size=1, max_size=3, open=False) as pool:
        async with pool.connection() as conn:
            assert isinstance(conn, pgreuse.AsyncConnection)
            cur = await conn.execute("select 41 + 1")
            assert await cur.fetchone() == (42,)
        assert pool.get_stats()["pool_max"] == 3


def test_unsupported_psycopg_fails_at_import_with_the_range():
    check("3.2.0")
    check("3.3.9")
    with pytest.raises(ImportError, match=r"psycopg 3\.1\.18 is installed"):
        check("3.1.18")
    with pytest.raises(ImportError, match=r"3\.2\.0 to 3\.3\.x"):
        check("3.4.0")
