"""--max-lifetime and --max-idle (issue #13, lifecycle): backends are recycled while idle, never
while lent, and clients notice nothing."""

from __future__ import annotations

import threading
import time

import pytest

from pgreuse.broker.config import BrokerConfig, ConfigError
from pgreuse.wire.states import SlotState


def test_max_lifetime_replaces_backends_while_idle_and_never_a_lent_one(make_broker):
    broker = make_broker("--max-size", "2", "--min-size", "2", "--max-lifetime", "1")
    first = {
        s.backend_pid for s in broker.wait_for(lambda s: s.count(SlotState.IDLE) == 2, what="2 open").slots
    }
    errors: list[BaseException] = []
    done = threading.Event()

    def busy() -> None:  # transactions all along: none of them may fail
        with broker.connect() as conn:
            while not done.is_set():
                try:
                    with conn.transaction():
                        conn.execute("select 1")
                except BaseException as exc:
                    errors.append(exc)
                time.sleep(0.005)

    t = threading.Thread(target=busy)
    t.start()
    try:
        with broker.connect() as holder, holder.transaction():
            # Held past its backend's lifetime: it stays this transaction's until the commit.
            (pid,) = holder.execute("select pg_backend_pid()").fetchone()
            time.sleep(2.5)
            assert holder.execute("select pg_backend_pid()").fetchone() == (pid,)
        # The held one is replaced after its commit, the other meanwhile (maybe more than once).
        snap = broker.wait_for(
            lambda s: first.isdisjoint(x.backend_pid for x in s.slots if x.state is not SlotState.CLOSED),
            timeout=15,
            what="both first backends replaced",
        )
    finally:
        done.set()
        t.join(10)
    assert not errors, errors[:3]
    assert snap.closed_by_reason["max_lifetime"] >= 2
    assert "--max-lifetime 1" in broker.log()


def test_max_idle_closes_unused_backends_down_to_min_size(make_broker):
    broker = make_broker("--max-size", "3", "--min-size", "1", "--max-idle", "1")
    conns = [broker.connect() for _ in range(3)]
    for conn in conns:
        conn.execute("select 1")  # three transactions at once: three backends open
    for conn in conns:
        conn.commit()
    broker.wait_for(lambda s: s.count(SlotState.CLOSED) == 0, what="3 backends open")
    snap = broker.wait_for(
        lambda s: s.closed_by_reason["max_idle"] == 2 and s.count(SlotState.CLOSED) == 2,
        timeout=15,
        what="the pool back at --min-size",
    )
    time.sleep(1.5)  # and no further: --min-size stays open
    assert broker.snapshot().closed_by_reason["max_idle"] == 2
    with conns[0] as conn:
        assert conn.execute("select 2").fetchone() == (2,)
    for conn in conns[1:]:
        conn.close()
    assert snap.counters["backends_opened"] == 3


@pytest.mark.parametrize(("flag", "field"), [("--max-lifetime", "max_lifetime"), ("--max-idle", "max_idle")])
def test_lifecycle_flags_are_checked(flag, field):
    with pytest.raises(ConfigError, match=f"{flag} -1.0 must be between 0 \\(never\\)"):
        BrokerConfig(dsn="host=/tmp", **{field: -1.0})
