"""The mission: many forked workers x threads share a few backends, and nothing is lost."""

from __future__ import annotations

import os
import threading
import time
import uuid

import psycopg

import pgreuse
from pgreuse.wire.states import SlotState

WORKERS = 8
THREADS = 4
TRANSACTIONS = 15
MAX_SIZE = 4


def _worker(conninfo: str, worker: int) -> int:
    """Run in a forked child: THREADS threads, each its own connection, TRANSACTIONS each."""
    failures: list[BaseException] = []

    def thread(t: int) -> None:
        try:
            with pgreuse.connect(conninfo) as conn:
                for n in range(TRANSACTIONS):
                    with conn.transaction():
                        conn.execute(
                            "insert into mission (worker, thread, n) values (%s, %s, %s)",
                            (worker, t, n),
                        )
                        (count,) = conn.execute(
                            "select count(*) from mission where worker = %s and thread = %s",
                            (worker, t),
                        ).fetchone()
                        # Our own earlier commits are visible on whichever backend we got.
                        assert count == n + 1, (count, n)
                        conn.execute("update mission set seen = %s where worker = %s and "
                                     "thread = %s and n = %s", (count, worker, t, n))  # fmt: skip
                    assert conn.lease is None
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=thread, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for f in failures:
        print(f"worker {worker}: {f!r}", flush=True)
    return 1 if failures else 0


def test_forked_workers_share_max_size_backends(make_broker, pg):
    app = f"mission-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(
            "drop table if exists mission; create table mission (worker int, thread int, n int, seen int)"
        )
    broker = make_broker("--max-size", str(MAX_SIZE), "--min-size", "0",
                         dsn=pg.dsn(application_name=app))  # fmt: skip

    # Watch PostgreSQL itself while the workers run: how many backends does the broker hold?
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        with psycopg.connect(pg.dsn(), autocommit=True) as watcher:
            while not stop.is_set():
                (n,) = watcher.execute(
                    "select count(*) from pg_stat_activity where application_name = %s", (app,)
                ).fetchone()
                peak = max(peak, n)
                time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    pids = []
    try:
        for w in range(WORKERS):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _worker(broker.conninfo, w)
                finally:
                    os._exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    finally:
        stop.set()
        sampler.join()

    assert codes == [0] * WORKERS, broker.log()[-5000:]
    with psycopg.connect(pg.dsn()) as admin:
        (rows, distinct, bad) = admin.execute(
            "select count(*), count(distinct (worker, thread, n)), "
            "count(*) filter (where seen is distinct from n + 1) from mission"
        ).fetchone()
    assert rows == distinct == WORKERS * THREADS * TRANSACTIONS
    assert bad == 0
    assert 1 <= peak <= MAX_SIZE
    snap = broker.wait_for(
        lambda s: s.count(SlotState.LENT) == 0 and s.counters["pending"] == 0,
        what="every lease returned",
    )
    assert snap.counters["leases"] >= WORKERS * THREADS * TRANSACTIONS
    assert snap.counters["backends_opened"] <= MAX_SIZE  # no backend was lost or replaced
    assert snap.counters["clients"] == 0  # every worker's control channel closed at exit
