"""Linger: under contention, a connection that comes straight back keeps its backend for its next
transaction (no hand-over, no wake-up), for at most LINGER_QUANTUM_NS; one that does not come back
within LINGER_STEAL_NS loses it to the table's first waiter. What a user sees: the waiters' turn
still comes within that bound, an abandoned backend is not lost, and closing gives it back."""

from __future__ import annotations

import threading
import time
from typing import Any

from broker_process import needs_claims
from pgreuse.client import hot
from pgreuse.wire.states import SlotState

pytestmark = needs_claims


def _busy(conn: Any, stop: threading.Event, lingered: list[bool], end_lingering: bool = False) -> None:
    """Statements in a loop until ``stop`` (``end_lingering``: until the first one that ends
    lingering, as an application whose thread moves on to other work after a statement)."""
    while not stop.is_set():
        conn.execute("select 1")
        if getattr(conn._hot, "lingering", False):
            lingered.append(True)
            if end_lingering:
                return


def _waiter_turn(broker: Any, box: list[float]) -> None:
    with broker.connect(autocommit=True) as b:
        t0 = time.monotonic()
        b.execute("select 1")
        box.append(time.monotonic() - t0)


def _pressure(broker: Any, busy: threading.Thread, waits: list[float], until: float = 10.0) -> None:
    """Waiters one after another, each queueing for the backend, until ``busy`` stops (a busy
    connection lingers only while somebody waits; on a loaded machine it may take a few turns)."""
    deadline = time.monotonic() + until
    while busy.is_alive() and time.monotonic() < deadline:
        _waiter_turn(broker, waits)


def _left_lingering(broker: Any) -> Any:
    """A connection that ran statements while others waited, until one ended lingering, and whose
    thread then moved on (as an application's to other work): the backend is left lingering, and
    the waiter then queued will take it."""
    a, _stop, t, lingered = _contended(broker, end_lingering=True)
    _pressure(broker, t, [])
    t.join(1)
    assert lingered and a._hot.lingering
    return a


def _contended(
    broker: Any, end_lingering: bool = False
) -> tuple[Any, threading.Event, threading.Thread, list[bool]]:
    """A connection in a loop of statements on the pool's one backend (it lingers as soon as
    somebody waits)."""
    a = broker.connect(autocommit=True)
    a.execute("select 1")
    assert a._hot is not hot.COLD
    stop = threading.Event()
    lingered: list[bool] = []
    t = threading.Thread(target=_busy, args=(a, stop, lingered, end_lingering))
    t.start()
    return a, stop, t, lingered


def test_a_waiter_gets_its_turn_while_a_busy_connection_lingers(make_broker):
    broker = make_broker("--max-size", "1")
    a, stop, t, lingered = _contended(broker)
    try:
        waits: list[float] = []
        deadline = time.monotonic() + 10
        while (len(waits) < 5 or not lingered) and time.monotonic() < deadline:
            _waiter_turn(broker, waits)
        # The busy connection kept its backend between statements (it lingered), yet each waiter
        # got it within the quantum and a steal, with room for a busy machine.
        assert lingered, "the busy connection never lingered while others waited"
        assert max(waits) < 0.5, waits
    finally:
        stop.set()
        t.join()
        a.close()


def test_a_backend_its_holder_does_not_come_back_for_goes_to_the_waiter(make_broker):
    broker = make_broker("--max-size", "1")
    # The busy connection runs until a statement ends lingering (somebody waits), then its thread
    # moves on, keeping the backend: the waiter then queued takes it after LINGER_STEAL_NS, not
    # when the holder comes back (it never does here).
    a, _stop, t, lingered = _contended(broker, end_lingering=True)
    waits: list[float] = []
    try:
        _pressure(broker, t, waits)
        t.join(1)
        assert lingered and a._hot.lingering
        assert waits and max(waits) < 1.0, waits
        broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="the backend back")
        assert a.execute("select 2").fetchone() == (2,)  # (and the holder goes on, with a claim)
    finally:
        a.close()


def test_closing_a_lingering_connection_gives_its_backend_back(make_broker):
    broker = make_broker("--max-size", "1")
    a = _left_lingering(broker)
    a.close()  # (the backend goes back at once, whether a waiter took it already or not)
    snap = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="nothing lent")
    assert snap.count(SlotState.IDLE) == 1
    with broker.connect(autocommit=True) as c:
        assert c.execute("select 2").fetchone() == (2,)


def test_no_linger_without_waiters(broker):
    with broker.connect(autocommit=True) as a:
        for _ in range(20):
            a.execute("select 1")
            assert not a._hot.lingering  # (nobody waits: the slot goes back idle, as always)
        assert a.lease is None


def test_a_holder_whose_lingering_backend_was_taken_waits_its_turn(make_broker):
    """The holder and whoever took its lingering backend never both use it."""
    broker = make_broker("--max-size", "1")
    a = _left_lingering(broker)  # (and the last waiter took it)
    has_it, done = threading.Event(), threading.Event()

    def holder() -> None:
        with broker.connect() as b, b.transaction():
            b.execute("select 1")
            has_it.set()
            done.wait(10)

    w = threading.Thread(target=holder)
    w.start()
    try:
        assert has_it.wait(5), "nobody got the backend the busy one left lingering"
        finished: list[float] = []
        late = threading.Thread(target=lambda: (a.execute("select 2"), finished.append(time.monotonic())))
        late.start()
        time.sleep(0.3)
        assert not finished, "the former holder went on with a backend somebody else holds"
        released = time.monotonic()
        done.set()
        late.join(5)
        assert finished and finished[0] >= released
    finally:
        done.set()
        w.join()
        a.close()


def test_each_transaction_is_counted_once_lingering_or_not(make_broker):
    """A lingering lease is counted when it begins to linger, not again when it is resumed, taken
    by a waiter or given back: the pool's lease count is the number of transactions."""
    broker = make_broker("--max-size", "1")
    a = broker.connect(autocommit=True)
    a.execute("select 1")
    broker.settle()
    before = broker.snapshot().counters["leases"]
    done: list[int] = []
    stop = threading.Event()

    lingered: list[bool] = []

    def busy() -> None:
        n = 0
        while not stop.is_set():
            a.execute("select 1")
            n += 1
            if a._hot.lingering:
                lingered.append(True)
        done.append(n)

    t = threading.Thread(target=busy)
    t.start()
    waits: list[float] = []
    try:
        deadline = time.monotonic() + 10
        while (len(waits) < 20 or not lingered) and time.monotonic() < deadline:
            _waiter_turn(broker, waits)
    finally:
        stop.set()
        t.join()
    assert lingered
    a.close()  # (gives back a backend it still lingers on)
    expected = before + done[0] + len(waits)
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="nothing lent")
    snap = broker.wait_for(lambda s: s.counters["leases"] >= expected, what="every lease counted")
    assert snap.counters["leases"] == expected
