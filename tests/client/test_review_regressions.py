"""Regressions found in review: leases that outlived their transaction, lost fds, bursts of requests."""

from __future__ import annotations

import asyncio
import os
import resource
import signal

import pytest

import pgreuse
from broker_process import needs_claims
from pgreuse.wire.states import SlotState


def test_executemany_gives_the_lease_back(make_broker):
    broker = make_broker("--max-size", "1", "--wait-timeout", "2")
    with broker.connect(autocommit=True) as a, broker.connect(autocommit=True) as b:
        a.cursor().executemany("select %s", [(i,) for i in range(5)])
        assert a.lease is None
        assert b.execute("select 1").fetchone() == (1,)  # the only backend is free again


def test_an_error_inside_a_pipeline_block_gives_the_lease_back(make_broker):
    broker = make_broker("--max-size", "1", "--wait-timeout", "2")
    with broker.connect(autocommit=True) as a, broker.connect(autocommit=True) as b:
        with pytest.raises(RuntimeError), a.pipeline():
            a.execute("select 1")
            raise RuntimeError("the application failed mid-pipeline")
        assert a.lease is None
        assert b.execute("select 2").fetchone() == (2,)


@needs_claims
def test_a_slot_whose_fd_cannot_arrive_goes_through_the_proxy(make_broker):
    # At the open-files limit the broker's fd arrives without its descriptor: the transaction goes
    # through the proxy instead, nothing leaks, and the fd is asked for again once (Want).
    broker = make_broker("--max-size", "1", "--wait-timeout", "2")
    conn = broker.connect(autocommit=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.lease is None
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="the backend back")
    broker.settle()
    with conn.transaction():
        assert conn.execute("select 3").fetchone() == (3,)
        assert conn.lease is not None  # the fd it asked for came, and the next claim works
    conn.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_burst_of_tasks_waits_instead_of_failing(make_broker, anyio_backend):
    # More requests than the broker's end of the control socket queues (its listen backlog, 512):
    # back-pressure, not an error, and no connection is thrown away.
    broker = make_broker("--max-size", "2")
    conns = [await pgreuse.connect_async(broker.conninfo, autocommit=True) for _ in range(560)]

    async def one(conn: pgreuse.AsyncConnection) -> int:
        cur = await conn.execute("select 1")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    # The broker stops reading for a moment (busy, or a GC pause): the requests pile up.
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        burst = asyncio.gather(*(one(c) for c in conns), return_exceptions=True)
        await asyncio.sleep(0.5)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    results = await burst
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert not any(c.closed for c in conns)
    for c in conns:
        await c.close()
