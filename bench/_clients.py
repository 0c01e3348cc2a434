"""The client side of ``bench/coordinator.py``: forked processes of threads that run one workload
against one target for a fixed time, and report how many transactions they finished.

Every process and thread connects first (not timed), runs a few warm-up transactions, says it is
ready, and waits; the parent then sets one deadline (``time.monotonic()``, the same clock in every
process on Linux) and lets them all go at once, so connection setup never counts and all clients run
over the same window. The parent reads the pooler's CPU time (``/proc/<pid>/stat``) when the window
opens and after every client has reported, which gives the pooler's CPU per transaction.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import psycopg
import psycopg_pool
from _harness import cpu_seconds, pin_self, servers_pinned

import pgreuse

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

    Messages = Queue[tuple[Any, ...]]

TARGETS = ("dedicated", "pgbouncer", "pgreuse-handoff", "pgreuse-proxy", "psycopg_pool")
DEDICATED, BOUNCER, HANDOFF, PROXY, POOLED = TARGETS
LEASE = "lease"  # the side-by-side workload (coordinator.py): not a Workload, it has its own runner

Kind = Literal["psycopg", "pgreuse", "pool"]
Script = Literal["select", "txn", "connect"]

WARMUP = 20  # transactions per thread before the window opens (1 for connect-per-request)
POOL_SIZE = 4  # the psycopg_pool reference: a pool of this many connections in every process
READY_TIMEOUT = 120.0  # seconds for every client to connect and warm up


class Target(NamedTuple):
    name: str
    conninfo: str
    kind: Kind  # plain psycopg connections, pgreuse.connect, or a psycopg_pool per process
    pooler_pid: int  # PgBouncer's or the broker's pid, whose CPU is measured; 0 for none


class Workload(NamedTuple):
    key: str
    title: str
    script: Script  # autocommit `select 1`; BEGIN + 3 x `select 1` + COMMIT; connect, select, close
    procs: int
    threads: int
    unit: str  # what one counted transaction is, per second: "tps" or "conn/s"


class _Sync(NamedTuple):
    """What the parent and its clients share: the clients' messages, the start, the deadline."""

    results: Messages
    go: Any  # multiprocessing Event
    end: Any  # multiprocessing Value("d"): the deadline, time.monotonic()


class Run(NamedTuple):
    rate: float  # transactions (or connections) per second, all clients together
    transactions: int
    median_us: float  # median latency of one transaction; only measured with one client, else nan
    cpu_user_us: float  # the pooler's CPU per transaction; nan without a pooler
    cpu_sys_us: float


def _connect(target: Target, autocommit: bool) -> psycopg.Connection[Any]:
    # Server-side prepared statements are off everywhere: PgBouncer 1.18 in transaction mode cannot
    # keep them, and pgreuse connections never use them; so every target runs the same protocol.
    if target.kind == "pgreuse":
        return pgreuse.connect(target.conninfo, autocommit=autocommit)
    return psycopg.connect(target.conninfo, autocommit=autocommit, prepare_threshold=None)


def _on_conn(script: Script, conn: psycopg.Connection[Any]) -> Callable[[], None]:
    if script == "select":

        def select() -> None:
            conn.execute("select 1").fetchone()

        return select

    def txn() -> None:
        for _ in range(3):
            conn.execute("select 1").fetchone()
        conn.commit()

    return txn


def _on_pool(script: Script, pool: psycopg_pool.ConnectionPool[Any]) -> Callable[[], None]:
    def txn() -> None:
        with pool.connection() as conn:  # commits on the way out
            for _ in range(1 if script == "select" else 3):
                conn.execute("select 1").fetchone()

    return txn


def _connect_per_request(target: Target) -> Callable[[], None]:
    def once() -> None:
        with _connect(target, autocommit=True) as conn:
            conn.execute("select 1").fetchone()

    return once


def _client_thread(
    target: Target, workload: Workload, pool: psycopg_pool.ConnectionPool[Any] | None, sync: _Sync
) -> None:
    conn = None
    try:
        if workload.script == "connect":
            fn = _connect_per_request(target)
        elif pool is not None:
            fn = _on_pool(workload.script, pool)
        else:
            conn = _connect(target, autocommit=workload.script == "select")
            fn = _on_conn(workload.script, conn)
        for _ in range(1 if workload.script == "connect" else WARMUP):
            fn()
        sync.results.put(("ready",))
        sync.go.wait()
        deadline = int(sync.end.value * 1e9)
        count = 0
        latencies: list[int] = []
        timed = workload.procs * workload.threads == 1
        now = time.monotonic_ns()
        while now < deadline:
            fn()
            count += 1
            if timed:
                t = time.monotonic_ns()
                latencies.append(t - now)
                now = t
            else:
                now = time.monotonic_ns()
        median_us = statistics.median(latencies) / 1000 if latencies else math.nan
        sync.results.put(("done", count, median_us))
    except BaseException as exc:
        sync.results.put(("error", f"{target.name}, {workload.key}: {type(exc).__name__}: {exc}"))
    finally:
        if conn is not None:
            conn.close()


def _client_process(target: Target, workload: Workload, sync: _Sync, client_cpu: int) -> None:
    pin_self(client_cpu)
    pool = None
    if target.kind == "pool" and workload.script != "connect":
        pool = psycopg_pool.ConnectionPool(
            target.conninfo,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": workload.script == "select", "prepare_threshold": None},
            open=True,
        )
        pool.wait(READY_TIMEOUT)
    threads = [
        threading.Thread(target=_client_thread, args=(target, workload, pool, sync))
        for _ in range(workload.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if pool is not None:
        pool.close()


def _collect(results: Messages, kind: str, n: int, timeout: float, procs: list[Any]) -> list[tuple[Any, ...]]:
    """``n`` messages of ``kind`` from the clients; the first error (or a dead client) raises."""
    got: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            msg = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a client process exited with code {dead[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n - len(got)} of {n} clients did not report {kind!r}") from None
            continue
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        got.append(msg)
    return got


def run(target: Target, workload: Workload, duration: float, client_cpu: int = -1) -> Run:
    """Run ``workload`` against ``target`` for ``duration`` seconds in freshly forked processes
    (pinned to ``client_cpu`` if it is not -1)."""
    ctx = mp.get_context("fork")  # the parent holds no connection and no thread: safe to fork
    results: Messages = ctx.Queue()
    go = ctx.Event()
    end = ctx.Value("d", 0.0, lock=False)
    sync = _Sync(results, go, end)
    procs = [
        ctx.Process(target=_client_process, args=(target, workload, sync, client_cpu), daemon=True)
        for _ in range(workload.procs)
    ]
    for p in procs:
        p.start()
    clients = workload.procs * workload.threads
    try:
        _collect(results, "ready", clients, READY_TIMEOUT, procs)
        before = cpu_seconds(target.pooler_pid) if target.pooler_pid else (math.nan, math.nan)
        end.value = time.monotonic() + duration
        go.set()
        done = _collect(results, "done", clients, duration + READY_TIMEOUT, procs)
        after = cpu_seconds(target.pooler_pid) if target.pooler_pid else (math.nan, math.nan)
    finally:
        go.set()  # a client still waiting (after an error elsewhere) runs an empty window and exits
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    count = sum(msg[1] for msg in done)
    n = max(count, 1)
    return Run(
        rate=count / duration,
        transactions=count,
        median_us=done[0][2] if clients == 1 else math.nan,
        cpu_user_us=(after[0] - before[0]) / n * 1e6,
        cpu_sys_us=(after[1] - before[1]) / n * 1e6,
    )


def _side_by_side_child(
    dedicated: Target, handoff: Target, duration: float, block: int, *, client_cpu: int, results: Messages
) -> None:
    try:
        pin_self(client_cpu)
        conns = [_connect(dedicated, autocommit=True), _connect(handoff, autocommit=True)]
        per_block: list[list[float]] = [[], []]
        for conn in conns:  # warm up
            for _ in range(WARMUP):
                conn.execute("select 1").fetchone()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            for conn, times in zip(conns, per_block, strict=True):
                # The client's CPU time, not the clock: a wall-clock block also holds PostgreSQL's
                # and other processes' turns on a busy 2-core machine (one round of a previous
                # workload's backends exiting moved the wall-clock difference by 50 µs).
                t0 = time.process_time()
                for _ in range(block):
                    conn.execute("select 1").fetchone()
                times.append((time.process_time() - t0) / block * 1e6)
        alone = _lease_alone(conns[1], duration / 4, block)
        for conn in conns:
            conn.close()
        results.put(("done", _low(per_block[0]), _low(per_block[1]), alone))
    except BaseException as exc:
        results.put(("error", f"lease side by side: {type(exc).__name__}: {exc}"))


def _lease_alone(conn: Any, duration: float, block: int) -> float:
    """µs of CPU per claim and release alone, with no statement: what the connection does at a
    transaction's first ``wait()`` (claim an idle slot in the table, ``dup2`` its socket in) and at
    its end (``dup2`` the parking socket back, release the slot). Private methods, called as the
    connection calls them: no public API runs one without the other. The 10th percentile of blocks."""
    samples: list[float] = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        t0 = time.process_time()
        for _ in range(block):
            conn._begin(None)
            conn._give_back(broken=False)
        samples.append((time.process_time() - t0) / block * 1e6)
    return _low(samples)


def _low(samples: list[float]) -> float:
    """The 10th percentile: the cost when nothing else on the machine got in the way."""
    return sorted(samples)[len(samples) // 10]


def side_by_side(
    dedicated: Target, handoff: Target, duration: float, servers: list[int], block: int = 50
) -> tuple[float, float, float]:
    """µs of the client's CPU per autocommit ``select 1`` on a dedicated connection and on a pgreuse
    one (and per claim and release alone, :func:`_lease_alone`), in one process, alternating blocks of
    ``block`` statements for ``duration`` seconds: the 10th percentile over the blocks of each. The
    processes under ``servers`` (PostgreSQL, the broker) run on the last CPU meanwhile and the client
    on the first: unpinned, the difference moved by 20 µs between rounds with where the scheduler put
    the client next to the backend.
    """
    ctx = mp.get_context("fork")
    results: Messages = ctx.Queue()
    with servers_pinned(servers) as client_cpu:
        proc = ctx.Process(
            target=_side_by_side_child,
            args=(dedicated, handoff, duration, block),
            kwargs={"client_cpu": client_cpu, "results": results},
        )
        proc.start()
        try:
            (msg,) = _collect(results, "done", 1, duration + READY_TIMEOUT, [proc])
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return msg[1], msg[2], msg[3]
