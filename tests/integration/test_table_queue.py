"""The table's wait queue (DESIGN.md §4): a sync worker's transaction that finds no idle backend
waits in the shared-memory table, and the worker that frees one hands it over directly. Each way a
waiter can go wrong (it dies while queued, it dies between taking and publishing its ticket) must
cost at most that waiter, never a backend or the queue.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import threading
import time
from typing import Any

import pytest

import pgreuse
from broker_process import needs_claims
from pgreuse import shm, slots
from pgreuse.wire.states import SlotState

pytestmark = [needs_claims, pytest.mark.usefixtures("lease_path")]


def _wait_in_thread(conn: pgreuse.Connection) -> tuple[threading.Thread, dict[str, Any]]:
    """Run one transaction on ``conn`` in a thread; the result says how it got its backend."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            with conn.transaction():
                out["row"] = conn.execute("select 2").fetchone()
                out["lease"] = conn.lease
                out["proxied"] = conn.proxied
        except BaseException as exc:
            out["error"] = exc
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_freed_backend_goes_to_the_waiter_in_the_table(make_broker):
    broker = make_broker("--max-size", "1", "--min-size", "1", "--wait-timeout", "10")
    broker.settle()
    with broker.connect() as holder, broker.connect() as other:
        holder.execute("select 1")  # a transaction holds the only backend
        t, out = _wait_in_thread(other)
        broker.wait_for(lambda s: s.counters["pending"] == 1, what="one waiter in the table")
        time.sleep(0.2)
        holder.commit()
        t.join(10)
    assert "error" not in out, out.get("error")
    assert out["row"] == (2,)
    # It waited in the table, not in the proxy: it holds the backend itself, and says how long.
    assert out["proxied"] is False and out["lease"] is not None
    assert out["lease"].waited >= 0.15
    snap = broker.wait_for(lambda s: s.count(SlotState.IDLE) == 1, what="the backend back")
    assert snap.counters["waits"] == 1
    assert snap.counters["pending"] == 0
    assert sum(snap.wait_histogram[1:]) == 1  # the wait is in a bucket above "no wait"


def _waiter(conninfo: str) -> None:  # pragma: no cover - runs in a child process, killed
    conn = pgreuse.connect(conninfo)
    conn.execute("select 1")
    os._exit(3)  # (it is killed before it gets here)


def test_a_waiter_killed_while_queued_costs_no_backend(make_broker):
    broker = make_broker("--max-size", "1", "--min-size", "1", "--wait-timeout", "10")
    broker.settle()
    ctx = multiprocessing.get_context("fork")
    with broker.connect() as holder, broker.connect() as other:
        holder.execute("select 1")
        child = ctx.Process(target=_waiter, args=(broker.conninfo,), daemon=True)
        child.start()
        broker.wait_for(lambda s: s.counters["pending"] == 1, what="the child waiting in the table")
        t, out = _wait_in_thread(other)  # queued behind the child
        broker.wait_for(lambda s: s.counters["pending"] == 2, what="two waiters")
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join()
        broker.wait_for(lambda s: s.counters["pending"] == 1, what="the dead waiter's ticket cancelled")
        holder.commit()
        t.join(10)
    assert "error" not in out, out.get("error")
    assert out["row"] == (2,) and out["took"] < 9
    # The backend went to the live waiter, and came back: nothing was handed to the dead one.
    snap = broker.wait_for(
        lambda s: s.count(SlotState.IDLE) == 1 and s.slots[0].holder in (slots.NOBODY, slots.BROKER),
        what="the backend back in the pool",
    )
    assert snap.closed_by_reason["holder_exited"] == 0


def test_a_ticket_its_process_never_published_is_skipped(make_broker):
    # A process killed between taking a ticket and publishing it leaves a gap at the queue's head,
    # which no release can serve: the broker skips it after a second, and the queue moves on.
    broker = make_broker("--max-size", "1", "--min-size", "1", "--wait-timeout", "10")
    broker.settle()
    table = shm.Table.open(shm.table_path(broker.socket_dir, broker.port), writable=True)
    try:
        with broker.connect() as holder, broker.connect() as other:
            holder.execute("select 1")
            tail = shm._queue_off(table.max_size) + slots.Q_TAIL
            (taken,) = struct.unpack_from("<Q", table._mm, tail)
            struct.pack_into("<Q", table._mm, tail, taken + 1)  # a ticket taken, never published
            t, out = _wait_in_thread(other)
            time.sleep(0.2)
            holder.commit()
            t.join(15)
    finally:
        table.close()
    assert "error" not in out, out.get("error")
    assert out["row"] == (2,)
    assert 0.5 < out["took"] < 8  # the gap cost about a second, not the wait timeout
    assert "skipped it" in broker.log()


def test_a_full_table_queue_sends_the_rest_through_the_proxy(make_broker):
    # --max-waiting bounds the table's queue and the proxy's together: one waits in the table, the
    # next is refused by the proxy at once.
    broker = make_broker("--max-size", "1", "--min-size", "1", "--max-waiting", "1", "--wait-timeout", "10")
    broker.settle()
    with broker.connect() as holder, broker.connect() as first, broker.connect() as second:
        holder.execute("select 1")
        t, out = _wait_in_thread(first)
        broker.wait_for(lambda s: s.counters["pending"] == 1, what="one waiter")
        t0 = time.monotonic()
        try:
            second.execute("select 1")
        except pgreuse.TooManyRequests as exc:
            refused = exc
        else:  # pragma: no cover - the assertion below reports it
            refused = None
        assert refused is not None and "--max-waiting 1" in str(refused)
        assert time.monotonic() - t0 < 2
        holder.commit()
        t.join(10)
    assert out["row"] == (2,) and out["proxied"] is False
