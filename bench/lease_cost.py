"""What a transaction costs through pgreuse's handoff, next to the alternatives, measured side by side.

    python bench/lease_cost.py [--transactions 2000]

Starts a throwaway PostgreSQL and a broker, then runs the same one-statement transaction
(``select 1``) in one process, one after another, four ways:

* ``direct``   a plain psycopg connection kept open (the floor: no pooling at all)
* ``pgreuse``  a pgreuse connection: lease, swap, query, swap back, release, per transaction
* ``connect``  a new plain psycopg connection per transaction (what an app without a pool pays)
* ``pgreuse-connect``  a new pgreuse connection per transaction (the parking startup at the broker)

It prints microseconds per transaction and the ratio to ``direct``. Timings on a shared machine are
noisy: compare the ratios of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import psycopg

import pgreuse
from pgreuse.devcluster import DevCluster


def measure(fn: Callable[[], None], n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean seconds per call of ``fn``."""
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        results.append((time.perf_counter() - t0) / n)
    return statistics.median(results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transactions", type=int, default=2000)
    args = p.parse_args()
    n = args.transactions
    cluster = DevCluster.create()
    sockets = tempfile.mkdtemp(prefix="pgr-b-", dir="/tmp")
    broker = subprocess.Popen(
        [sys.executable, "-m", "pgreuse.broker", "--dsn", cluster.dsn(), "--socket-dir", sockets,
         "--port", "6432", "--max-size", "2", "--log-level", "WARNING"],
    )  # fmt: skip
    try:
        conninfo = f"host={sockets} port=6432 dbname={cluster.dbname} user=postgres"
        deadline = time.monotonic() + 20
        while not os.path.exists(f"{sockets}/.s.PGREUSE.6432"):
            if time.monotonic() > deadline:
                raise RuntimeError("broker did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        direct = psycopg.connect(cluster.dsn(), autocommit=True)
        shared = pgreuse.connect(conninfo, autocommit=True)

        def run_direct() -> None:
            direct.execute("select 1").fetchone()

        def run_pgreuse() -> None:
            shared.execute("select 1").fetchone()

        def run_connect() -> None:
            with psycopg.connect(cluster.dsn(), autocommit=True) as c:
                c.execute("select 1").fetchone()

        def run_pgreuse_connect() -> None:
            with pgreuse.connect(conninfo, autocommit=True) as c:
                c.execute("select 1").fetchone()

        for fn in (run_direct, run_pgreuse):  # warm up
            measure(fn, 200, rounds=1)
        rows = [
            ("direct", measure(run_direct, n)),
            ("pgreuse", measure(run_pgreuse, n)),
            ("connect", measure(run_connect, max(50, n // 20))),
            ("pgreuse-connect", measure(run_pgreuse_connect, max(50, n // 10))),
        ]
        base = rows[0][1]
        print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), PostgreSQL over a Unix socket, "
              f"{n} transactions of 'select 1' in one process\n")  # fmt: skip
        print("| mode | µs per transaction | vs direct |")
        print("|---|---:|---:|")
        for name, sec in rows:
            print(f"| {name} | {sec * 1e6:.1f} | {sec / base:.2f}x |")
        lease = rows[1][1] - base
        print(f"\nlease overhead (pgreuse - direct): {lease * 1e6:.1f} µs per transaction")
        direct.close()
        shared.close()
    finally:
        broker.terminate()
        broker.wait()
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
