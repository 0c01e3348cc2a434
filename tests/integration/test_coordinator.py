"""The shared-memory coordinator under stress: claims and releases from many processes, some killed
at random moments, and fairness between the claim path and the proxy's queue (DESIGN.md §4).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import statistics
import threading
import time
from typing import Any

import psycopg

import pgreuse
from broker_process import needs_claims
from pgreuse.wire.states import SlotState

MAX_SIZE = 3


def _hammer(conninfo: str, owners: Any, violations: Any, out_dir: str) -> None:
    """A worker: transactions forever, each checking that it alone owns the slot it claimed.

    ``owners[slot]`` holds ``generation << 32 | pid`` of the process inside a transaction on that
    slot's backend, 0 when none. It is cleared before the commit, so a process killed at any point
    leaves either 0 or an entry of a generation the broker has since replaced (it closes the
    backend of a holder that died holding it)."""
    random.seed(os.getpid())
    me = os.getpid()
    committed = open(os.path.join(out_dir, f"{me}.txt"), "a")  # noqa: SIM115 - lives until killed
    conn = pgreuse.connect(conninfo)
    n = 0
    while True:
        n += 1
        tx = me * 1_000_000 + n
        with conn.transaction():
            conn.execute("insert into ledger values (%s, 1)", (tx,))
            lease = conn.lease
            if lease is not None:
                mine = lease.generation << 32 | me
                seen = owners[lease.slot]
                if seen and seen >> 32 == lease.generation:
                    violations.value += 1  # someone else is inside a transaction on our backend
                owners[lease.slot] = mine
                if random.random() < 0.3:
                    time.sleep(random.random() * 0.002)
                conn.execute("insert into ledger values (%s, 2)", (tx,))
                if owners[lease.slot] != mine:
                    violations.value += 1
                owners[lease.slot] = 0
            else:
                conn.execute("insert into ledger values (%s, 2)", (tx,))
        committed.write(f"{tx}\n")
        committed.flush()
        time.sleep(random.random() * 0.004)  # think time: the queue empties, and most transactions claim


@needs_claims
def test_claims_survive_holders_killed_at_random_points(make_broker, pg, tmp_path):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(
            "drop table if exists ledger; create table ledger (tx bigint, part int, primary key (tx, part))"
        )
    broker = make_broker("--max-size", str(MAX_SIZE), "--min-size", str(MAX_SIZE), "--wait-timeout", "20")
    broker.settle()
    ctx = multiprocessing.get_context("fork")
    owners = ctx.Array("q", MAX_SIZE, lock=False)
    violations = ctx.Value("i", 0, lock=False)

    def spawn() -> multiprocessing.process.BaseProcess:
        p = ctx.Process(
            target=_hammer, args=(broker.conninfo, owners, violations, str(tmp_path)), daemon=True
        )
        p.start()
        return p

    procs = [spawn() for _ in range(6)]
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.02, 0.15))  # anywhere in a claim, a transaction or a release
        i = rng.randrange(len(procs))
        os.kill(procs[i].pid, signal.SIGKILL)  # type: ignore[arg-type]
        procs[i].join()
        kills += 1
        procs[i] = spawn()
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        p.join()
    kills += len(procs)

    assert violations.value == 0, f"{violations.value} transactions shared a backend with another"
    # The pool is back at full strength, every slot open and nobody holding one.
    snap = broker.wait_for(
        lambda s: s.count(SlotState.IDLE) == MAX_SIZE and all(x.holder in (0, 1) for x in s.slots),
        timeout=30,
        what="the pool back at full strength",
    )
    assert snap.closed_by_reason["holder_exited"] >= 1  # some were killed holding a backend
    seen: set[int] = set()
    for name in os.listdir(tmp_path):
        with open(tmp_path / name) as f:
            seen.update(int(line) for line in f if line.strip())
    with psycopg.connect(pg.dsn()) as admin:
        parts = dict(admin.execute("select tx, count(*) from ledger group by tx").fetchall())
        (backends,) = admin.execute(
            "select count(*) from pg_stat_activity "
            "where backend_type = 'client backend' and pid <> pg_backend_pid()"
        ).fetchone()
    assert seen, "no transaction committed"
    assert not seen - set(parts), "a transaction a client saw commit is missing"
    assert all(n == 2 for n in parts.values()), "a transaction was committed by half"
    with broker.connect(autocommit=True) as conn:  # and it serves
        assert conn.execute("select count(*) from ledger").fetchone() == (2 * len(parts),)
    assert backends <= MAX_SIZE + 1  # the pool's, and the check's connection above (its own pid excluded)
    claimed = snap.counters["leases"] - snap.counters["waits"]
    print(f"{kills} processes killed, {len(seen)} commits seen, {claimed} of {snap.counters['leases']} "
          f"leases claimed, closed: {snap.closed_by_reason}")  # fmt: skip
    assert claimed > snap.counters["leases"] / 2  # the claim path is what was hammered


def test_no_thread_starves_when_32_threads_share_4_backends(make_broker, lease_path):
    # Claims and the proxy's FIFO together: when the proxy has waiters a new transaction queues
    # behind them, so no thread keeps losing the race for a backend.
    broker = make_broker("--max-size", "4", "--min-size", "4", "--wait-timeout", "30")
    broker.settle()
    counts = [0] * 32
    worst = [0.0] * 32
    stop = threading.Event()

    def work(i: int) -> None:
        with broker.connect(autocommit=True) as conn:
            while not stop.is_set():
                t0 = time.monotonic()
                with conn.transaction():
                    conn.execute("select pg_sleep(0.001)")
                worst[i] = max(worst[i], time.monotonic() - t0)
                counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(30)
    snap = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="every backend back")
    mean = statistics.mean(counts)
    print(f"per thread: min {min(counts)} median {statistics.median(counts)} max {max(counts)}; "
          f"worst wait {max(worst) * 1000:.0f} ms; waits {snap.counters['waits']}; "
          f"wait histogram {snap.wait_histogram}")  # fmt: skip
    assert min(counts) >= mean / 4, counts  # nobody starved
    assert max(worst) < 5.0, worst
    assert snap.counters["waits"] > 0  # the proxy's queue was used
