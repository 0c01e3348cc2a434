"""Chaos under load (issue #13): money moves between accounts from 8 processes x 4 threads through a
pool of 4 while processes are SIGKILLed at random moments, backends are terminated, the broker is
SIGKILLed and restarted, and PostgreSQL is restarted.

After: every transaction a client saw commit is in the database, no transaction is there by half
(each account's balance is what the ledger says), the total never changed, PostgreSQL never saw more
than --max-size backends of the pool, the pool is back at full strength, and workers that lived
through the restarts commit again without being restarted.

``PGREUSE_CHAOS_SECONDS`` sets the length (CI: 60 s; ``nox -s chaos``: 600 s).
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

import pgreuse
from broker_process import BrokerProcess
from pgreuse.broker.exits import RETIRING_APP
from pgreuse.wire.states import SlotState

MAX_SIZE = 4
PROCS, THREADS = 8, 4
ACCOUNTS, START = 50, 1000
SECONDS = float(os.environ.get("PGREUSE_CHAOS_SECONDS", "60"))
# What clients see of the faults: PostgreSQL down or restarting, the broker gone, a backend ended.
# Others are shown with their message. (psycopg reports a backend ended right after a command's
# result, its FATAL a second result, as InternalError "received 2 results from command 'COMMIT'":
# on a dedicated connection too.)
EXPECTED_ERRORS = {
    "BackendUnavailable",
    "BrokerUnavailable",
    "AdminShutdown",
    "OperationalError",
    "PoolTimeout",
}


def _mover(conninfo: str, out_dir: str, errors: Any) -> None:  # pragma: no cover - a child, killed
    """A worker process: THREADS threads moving money, each recording the ids of the transfers it
    saw commit; any error: a new connection (as a web worker's next request would get)."""
    me = os.getpid()
    lock = threading.Lock()
    out = open(os.path.join(out_dir, f"{me}.txt"), "a")  # noqa: SIM115 - lives until killed
    # SIGUSR1: every thread's stack, for a survivor that stopped committing
    stacks = open(os.path.join(out_dir, f"{me}.stacks"), "w")  # noqa: SIM115 - lives until killed
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)

    def run(t: int) -> None:
        rng = random.Random(me * 100 + t)
        n = 0
        conn: pgreuse.Connection | None = None
        while True:
            try:
                if conn is None or conn.closed:
                    conn = pgreuse.connect(conninfo)
                n += 1
                tx = (me * 100 + t) * 1_000_000 + n
                src, dst = rng.sample(range(ACCOUNTS), 2)
                amount = rng.randrange(1, 50)
                with conn.transaction():
                    conn.execute("insert into ledger values (%s, %s, %s, %s)", (tx, src, dst, amount))
                    # (rows in id order: transfers do not deadlock one another)
                    for account, delta in sorted([(src, -amount), (dst, amount)]):
                        conn.execute(
                            "update accounts set balance = balance + %s where id = %s", (delta, account)
                        )
                with lock:
                    out.write(f"{tx} {time.time():.3f}\n")
                    out.flush()
            except Exception as exc:
                kind = type(exc).__name__
                if kind not in EXPECTED_ERRORS:
                    kind = f"{kind}: {str(exc)[:80]}"  # (the unexpected ones, with what they said)
                with lock:
                    errors[kind] = errors.get(kind, 0) + 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                time.sleep(rng.uniform(0.01, 0.05))

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _backends(admin: psycopg.Connection[Any], user: str) -> int:
    (n,) = admin.execute(  # type: ignore[misc]
        "select count(*) from pg_stat_activity where backend_type = 'client backend' "
        "and pid <> pg_backend_pid() and usename = %s and application_name <> %s",
        (user, RETIRING_APP),
    ).fetchone()
    return int(n)


class _Sampler(threading.Thread):
    """Counts the pool's backends every 25 ms, from a connection of its own (reopened after a
    PostgreSQL restart)."""

    def __init__(self, dsn: str, user: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.user = dsn, user
        self.samples: list[int] = []
        self.over: list[tuple[float, int]] = []  # (when, how many) of the samples over the bound
        self.stop = threading.Event()

    def run(self) -> None:
        admin: psycopg.Connection[Any] | None = None
        while not self.stop.wait(0.025):
            try:
                if admin is None or admin.closed:
                    admin = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                n = _backends(admin, self.user)
                self.samples.append(n)
                if n > MAX_SIZE:
                    self.over.append((time.time(), n))
            except psycopg.Error:
                admin = None
        if admin is not None:
            admin.close()


@pytest.mark.timeout(SECONDS + 120)
def test_money_survives_chaos(pg_private, short_tmp, tmp_path):
    pg = pg_private
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("create table accounts (id int primary key, balance bigint not null)")
        admin.execute(
            "insert into accounts select g, %s from generate_series(0, %s) g", (START, ACCOUNTS - 1)
        )
        admin.execute("create table ledger (id bigint primary key, src int, dst int, amount int)")
        # The worker role: the pool's backends are counted by user, apart from this test's own (and from
        # the one connection a restarted broker opens to end the dead one's backends: RETIRING_APP).
        admin.execute("create role chaos login superuser")
    dsn = pg.dsn(user="chaos")
    broker = BrokerProcess(dsn, short_tmp, 6432, ["--max-size", str(MAX_SIZE), "--min-size", str(MAX_SIZE),
                                                  "--wait-timeout", "10", "--log-level", "INFO"])  # fmt: skip
    broker.start()
    ctx = multiprocessing.get_context("fork")
    manager = ctx.Manager()
    errors = manager.dict()

    def spawn() -> Any:
        p = ctx.Process(target=_mover, args=(broker.conninfo, str(tmp_path), errors), daemon=True)
        p.start()
        return p

    sampler = _Sampler(pg.dsn(), "chaos")
    sampler.start()
    procs = [spawn() for _ in range(PROCS)]
    survivors = set(p.pid for p in procs)  # processes never killed, through every restart
    rng = random.Random(13)
    faults: Counter[str] = Counter()
    timeline: list[tuple[float, str]] = []
    start = time.monotonic()
    broker_restart, pg_restart = start + SECONDS * 0.35, start + SECONDS * 0.65
    restarts_done_at = 0.0
    try:
        while time.monotonic() - start < SECONDS:
            time.sleep(rng.uniform(0.05, 0.45))
            now = time.monotonic()
            if broker_restart and now >= broker_restart:
                timeline.append((time.time(), "broker SIGKILLed"))
                broker.kill()
                faults["broker SIGKILLed"] += 1
                broker.start()
                timeline.append((time.time(), "broker started"))
                broker_restart = 0.0
                restarts_done_at = time.time()
            elif pg_restart and now >= pg_restart:
                timeline.append((time.time(), "PostgreSQL restart"))
                pg.restart()
                timeline.append((time.time(), "PostgreSQL restarted"))
                faults["PostgreSQL restarted"] += 1
                pg_restart = 0.0
                restarts_done_at = time.time()
            elif rng.random() < 0.2:
                with contextlib.suppress(psycopg.Error), psycopg.connect(pg.dsn(), autocommit=True) as admin:
                    admin.execute(
                        "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'chaos' "
                        "and backend_type = 'client backend' order by random() limit 1"
                    )
                    faults["backend terminated"] += 1
            else:
                i = rng.randrange(len(procs))
                if procs[i].pid in survivors and len(survivors) <= 2:
                    continue  # keep two that live through everything
                survivors.discard(procs[i].pid)
                os.kill(procs[i].pid, signal.SIGKILL)
                procs[i].join()
                faults["worker SIGKILLed"] += 1
                procs[i] = spawn()
        time.sleep(3)  # the survivors commit again after the last fault
        for pid in survivors:
            os.kill(pid, signal.SIGUSR1)  # (their stacks now, in case one stopped committing)
        time.sleep(0.2)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.join()
        sampler.stop.set()
        sampler.join(10)

    committed: dict[int, float] = {}
    by_process: dict[int, list[float]] = {}
    for name in os.listdir(tmp_path):
        if not name.endswith(".txt"):
            continue
        with open(tmp_path / name) as f:
            for line in f.read().splitlines():
                parts = line.split()
                if len(parts) == 2:  # (a process killed mid-write leaves half a line)
                    committed[int(parts[0])] = float(parts[1])
                    by_process.setdefault(int(name.split(".")[0]), []).append(float(parts[1]))
    snap = broker.wait_for(
        lambda s: s.count(SlotState.IDLE) == MAX_SIZE, timeout=30, what="the pool back at full strength"
    )
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        ids = {r[0] for r in admin.execute("select id from ledger")}
        (total,) = admin.execute("select sum(balance) from accounts").fetchone()  # type: ignore[misc]
        mismatched = admin.execute(
            "select a.id from accounts a left join ("
            " select id, sum(d) d from (select src id, -amount d from ledger"
            "  union all select dst, amount from ledger) m group by id) m using (id)"
            " where a.balance <> %s + coalesce(m.d, 0)",
            (START,),
        ).fetchall()
    with broker.connect(autocommit=True) as conn:
        assert conn.execute("select count(*) from ledger").fetchone() == (len(ids),)
    broker.stop()
    print(
        f"\n{SECONDS:g}s: {len(committed)} commits seen, {len(ids)} in the ledger; faults {dict(faults)}; "
        f"client errors {dict(errors)}; backends max {max(sampler.samples)} in {len(sampler.samples)} "
        f"samples; pool {snap.counters['backends_opened']} opened, closed {snap.closed_by_reason}"
    )
    assert faults["worker SIGKILLed"] >= min(100, int(SECONDS * 1.2)), faults
    assert not set(committed) - ids, "a transfer a client saw commit is missing"
    assert total == ACCOUNTS * START, "money was made or lost"
    assert not mismatched, f"accounts whose balance the ledger does not explain: {mismatched}"
    assert max(sampler.samples) <= MAX_SIZE, (
        f"PostgreSQL saw up to {max(sampler.samples)} backends of a pool of {MAX_SIZE}: "
        f"{Counter(sampler.samples)}; over at {sampler.over}; restarts {timeline}"
    )
    # The workers that were never killed committed again after the last restart, on their own.
    for pid in survivors:
        if not any(t > restarts_done_at + 1 for t in by_process.get(pid, [])):
            with open(tmp_path / f"{pid}.stacks") as f:
                raise AssertionError(f"pid {pid} stopped committing; its threads:\n{f.read()}")
