"""Soak: mixed load through one broker for a long time, with faults now and then, watching for leaks.

``nox -s soak`` (10 minutes; ``nox -s soak -- --minutes 2`` for less). One throwaway PostgreSQL and a
broker with ``--max-size 4``; for the whole run:

* 4 processes x 4 threads of pgreuse connections (handoff), each running short transactions;
* 2 processes x 2 threads of plain psycopg connections through the broker's proxy;
* 2 processes that connect, run one statement and close, over and over (connect per request).

Every 10 s a fault: a worker process SIGKILLed (and started again) or a backend of the pool ended
with ``pg_terminate_backend``, in turn. Once a second it samples: transactions committed, client
errors by kind, the pool's backends as PostgreSQL sees them, the broker's RSS and open fds. It prints
a table every minute and, at the end, draws ``docs/soak.png`` and writes ``bench/results/soak.json``.
Flat RSS and fd lines and a backend count never above 4 mean no leak.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import psycopg
from _harness import pgreuse_broker

import pgreuse
from pgreuse.devcluster import DevCluster

MAX_SIZE = 4


def _worker(kind: str, conninfo: str, threads: int, counts: Any, errors: Any) -> None:
    """A client process: ``kind`` is handoff, proxy or connect."""
    lock = threading.Lock()

    def count(key: str, table: Any) -> None:
        with lock:
            table[key] = table.get(key, 0) + 1

    def run() -> None:
        conn: Any = None
        while True:
            try:
                if kind == "connect":
                    with pgreuse.connect(conninfo, autocommit=True) as c:
                        c.execute("select 1").fetchone()
                else:
                    if conn is None or conn.closed:
                        conn = (
                            pgreuse.connect(conninfo)
                            if kind == "handoff"
                            else psycopg.connect(conninfo, prepare_threshold=None)
                        )
                    with conn.transaction():
                        conn.execute("select pg_sleep(0.0005)")
                        conn.execute("select 1").fetchone()
                count(kind, counts)
            except Exception as exc:
                count(type(exc).__name__, errors)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
                time.sleep(0.05)

    for t in [threading.Thread(target=run, daemon=True) for _ in range(threads)]:
        t.start()
    while True:
        time.sleep(3600)


def _broker_stats(pid: int) -> tuple[int, int]:
    """RSS (kB) and open fds of the broker."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--png", default="docs/soak.png", help="chart path ('' for none)")
    ap.add_argument("--json", default="bench/results/soak.json")
    args = ap.parse_args(argv)
    cluster = DevCluster.create(max_connections=100)
    ctx = mp.get_context("fork")
    manager = ctx.Manager()
    counts, errors = manager.dict(), manager.dict()
    samples: list[dict[str, Any]] = []
    faults: Counter[str] = Counter()
    try:
        with pgreuse_broker(cluster, MAX_SIZE) as (sock_dir, broker_pid):
            conninfo = f"host={sock_dir} port=6441 dbname={cluster.dbname} user={cluster.superuser}"
            plan = [("handoff", 4)] * 4 + [("proxy", 2)] * 2 + [("connect", 1)] * 2

            def spawn(kind: str, threads: int) -> Any:
                p = ctx.Process(target=_worker, args=(kind, conninfo, threads, counts, errors), daemon=True)
                p.start()
                return p

            procs = [spawn(k, n) for k, n in plan]
            admin = psycopg.connect(cluster.dsn(), autocommit=True)
            start = time.monotonic()
            end = start + args.minutes * 60
            rng = random.Random(7)
            next_fault, turn = start + 10, 0
            while time.monotonic() < end:
                time.sleep(1)
                now = time.monotonic()
                if now >= next_fault:
                    next_fault, turn = now + 10, turn + 1
                    if turn % 2:
                        i = rng.randrange(len(procs))
                        os.kill(procs[i].pid, signal.SIGKILL)
                        procs[i].join()
                        procs[i] = spawn(*plan[i])
                        faults["worker SIGKILLed"] += 1
                    else:
                        admin.execute(
                            "select pg_terminate_backend(pid) from pg_stat_activity where pid <> "
                            "pg_backend_pid() and backend_type = 'client backend' and application_name "
                            "not like 'psql%' order by random() limit 1"
                        )
                        faults["backend terminated"] += 1
                (backends,) = admin.execute(
                    "select count(*) from pg_stat_activity where backend_type = 'client backend' "
                    "and pid <> pg_backend_pid()"
                ).fetchone()  # type: ignore[misc]
                rss, fds = _broker_stats(broker_pid)
                samples.append({
                    "t": round(now - start, 1), "transactions": sum(counts.values()),
                    "errors": dict(errors), "backends": backends, "rss_kb": rss, "fds": fds,
                })  # fmt: skip
                if len(samples) % 60 == 0:
                    s = samples[-1]
                    print(f"{s['t']:6.0f}s  {s['transactions']:>9} tx  backends {s['backends']}  "
                          f"broker RSS {s['rss_kb'] / 1024:.1f} MB  fds {s['fds']}  errors {s['errors']}",
                          flush=True)  # fmt: skip
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join()
            admin.close()
    finally:
        cluster.destroy()
    steady = samples[len(samples) // 10 :]  # after the first tenth (warm-up)
    result = {
        "minutes": args.minutes, "max_size": MAX_SIZE, "faults": dict(faults),
        "transactions": samples[-1]["transactions"], "errors": samples[-1]["errors"],
        "max_backends": max(s["backends"] for s in samples),
        "rss_kb": [steady[0]["rss_kb"], steady[-1]["rss_kb"]], "fds": [steady[0]["fds"], steady[-1]["fds"]],
        "samples": samples,
    }  # fmt: skip
    print(f"\n{args.minutes:g} min: {result['transactions']} transactions, faults {dict(faults)}, "
          f"client errors {result['errors']}; backends at most {result['max_backends']} of {MAX_SIZE}; "
          f"broker RSS {result['rss_kb'][0] / 1024:.1f} -> {result['rss_kb'][1] / 1024:.1f} MB, "
          f"fds {result['fds'][0]} -> {result['fds'][1]} (after the first tenth)")  # fmt: skip
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.png:
        _chart(samples, args.png)
    return 0 if result["max_backends"] <= MAX_SIZE else 1


def _chart(samples: list[dict[str, Any]], path: str) -> None:
    import matplotlib  # noqa: PLC0415 - only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [s["t"] / 60 for s in samples]
    rate = [0.0] + [
        max(0, b["transactions"] - a["transactions"]) / max(0.1, b["t"] - a["t"])
        for a, b in itertools.pairwise(samples)
    ]
    series = [
        (rate, "transactions/s"),
        ([s["backends"] for s in samples], f"backends (max {MAX_SIZE})"),
        ([s["rss_kb"] / 1024 for s in samples], "broker RSS, MB"),
        ([s["fds"] for s in samples], "broker open fds"),
    ]
    fig, axes = plt.subplots(4, 1, figsize=(10, 8), dpi=100, sharex=True)
    for ax, (ys, label) in zip(axes, series, strict=True):
        ax.plot(t, ys, lw=0.8)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes (a fault every 10 s: a worker killed, or a backend terminated)")
    fig.suptitle("pgreuse soak: handoff, proxy and connect-per-request load through --max-size 4")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
