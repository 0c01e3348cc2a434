"""Benchmark: pgreuse's handoff and proxy next to PgBouncer, dedicated connections and psycopg_pool.

Starts one throwaway PostgreSQL (:class:`~pgreuse.devcluster.DevCluster`), PgBouncer in transaction
mode with a pool of 4, and a pgreuse broker with ``--max-size 4``, then runs five targets:

* ``dedicated``        plain psycopg connections to PostgreSQL, one per thread (the floor; off-budget)
* ``pgbouncer``        plain psycopg connections through PgBouncer
* ``pgreuse-handoff``  ``pgreuse.connect()`` connections: each transaction leases a backend's socket
* ``pgreuse-proxy``    plain psycopg connections to the same broker's socket: proxy mode
* ``psycopg_pool``     a ``psycopg_pool.ConnectionPool`` of 4 in every process (off-budget reference)

over five workloads:

1. ``single``   1 client, autocommit ``select 1``: µs per statement (median) and tps
2. ``select``   8 processes x 4 threads over 4 backends, autocommit ``select 1``: tps
3. ``txn``      the same, ``BEGIN; 3 x select 1; COMMIT``: tps
4. ``connect``  8 processes, each connect -> ``select 1`` -> close in a loop: connections per second
5. ``lease``    what pgreuse adds per statement: client CPU per ``select 1`` through pgreuse-handoff
                minus dedicated, both connections in one process, alternating blocks of statements,
                with PostgreSQL and the broker pinned to one CPU and the client to another; and the
                claim and release alone, with no statement

Every round runs each target once per workload (in an order that rotates from round to round), so
the drift of a shared machine hits every target alike. The table shows medians over rounds; ratios are
taken within each round, then the median is shown. Also written: all runs as JSON, and a chart of each
target's throughput relative to PgBouncer's. Needs ``pgbouncer`` (``apt-get install pgbouncer``) unless
``--no-pgbouncer``, and the PostgreSQL server binaries.

Usage::

    python bench/coordinator.py [--duration 5] [--rounds 3] [--workloads single,select,txn,connect,lease]
        [--targets ...] [--no-pgbouncer] [--pool 4] [--json bench/results/coordinator.json]
        [--png docs/coordinator.png]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import psycopg
from _chart import chart
from _clients import (
    BOUNCER,
    DEDICATED,
    HANDOFF,
    LEASE,
    POOL_SIZE,
    POOLED,
    PROXY,
    TARGETS,
    Run,
    Target,
    Workload,
    run,
    side_by_side,
)
from _harness import (
    PGBOUNCER_PORT,
    PGREUSE_PORT,
    pgbouncer,
    pgbouncer_exe,
    pgreuse_broker,
    postmaster_pid,
    servers_pinned,
)
from _summary import report, summarize

import pgreuse
from pgreuse.devcluster import DevCluster

HERE = os.path.dirname(os.path.abspath(__file__))
POOL = 4  # PgBouncer's pool and the broker's --max-size (--pool)


def workloads(procs: int, threads: int) -> dict[str, Workload]:
    many = f"{procs} proc x {threads} thr"
    return {
        w.key: w
        for w in (
            Workload("single", "1 client, select 1", "select", 1, 1, "tps"),
            Workload("select", f"{many}, select 1", "select", procs, threads, "tps"),
            Workload("txn", f"{many}, BEGIN; 3 x select 1; COMMIT", "txn", procs, threads, "tps"),
            Workload("connect", f"{procs} proc, connect + select 1 + close", "connect", procs, 1, "conn/s"),
        )
    }


def _finite(obj: Any) -> Any:
    """``obj`` with NaN floats as None: strict JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _nan(obj: Any) -> Any:
    """The inverse of :func:`_finite`, for a JSON file read back (``--replot``)."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


def _versions(cluster: DevCluster) -> dict[str, str]:
    with psycopg.connect(cluster.dsn()) as conn:
        row = conn.execute("show server_version").fetchone()
    out = {
        "postgresql": row[0] if row else "?",
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__})",
        "pgreuse": getattr(pgreuse, "__version__", "?"),
        "python": platform.python_version(),
    }
    git = ["git", "-C", HERE, "describe", "--always", "--dirty"]
    done = subprocess.run(git, capture_output=True, text=True, check=False)
    out["pgreuse_commit"] = done.stdout.strip() or "?"
    return out


def _pgbouncer_version() -> str:
    done = subprocess.run([pgbouncer_exe(), "--version"], capture_output=True, text=True, check=False)
    return (done.stdout.splitlines() or ["?"])[0]


def measure(args: argparse.Namespace, chosen: list[str], names: list[str]) -> dict[str, Any]:
    """Start PostgreSQL and the poolers, run every round; return everything as a JSON-able dict."""
    loads = workloads(args.procs, args.threads)
    runs: list[dict[str, Any]] = []
    leases: list[dict[str, Any]] = []
    cluster = DevCluster.create(max_connections=120)
    try:
        meta: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "duration": args.duration,
            "rounds": args.rounds,
            "pool_size": args.pool,
            "psycopg_pool_size": POOL_SIZE,
            "cpus": os.cpu_count(),
            "workloads": {k: loads[k]._asdict() for k in chosen if k in loads},
            "versions": _versions(cluster),
        }
        with ExitStack() as stack:
            targets = {DEDICATED: Target(DEDICATED, cluster.dsn(), "psycopg", 0)}
            if BOUNCER in names:
                meta["versions"]["pgbouncer"] = _pgbouncer_version()
                bdir, bpid = stack.enter_context(pgbouncer(cluster, args.pool))
                targets[BOUNCER] = Target(
                    BOUNCER, cluster.dsn(host=bdir, port=str(PGBOUNCER_PORT)), "psycopg", bpid
                )
            if HANDOFF in names or PROXY in names or LEASE in chosen:
                rdir, rpid = stack.enter_context(pgreuse_broker(cluster, args.pool))
                broker = cluster.dsn(host=rdir, port=str(PGREUSE_PORT))
                targets[HANDOFF] = Target(HANDOFF, broker, "pgreuse", rpid)
                targets[PROXY] = Target(PROXY, broker, "psycopg", rpid)
            targets[POOLED] = Target(POOLED, cluster.dsn(), "pool", 0)
            # PostgreSQL and the poolers: the processes the one-client runs keep on their own CPU.
            servers = [postmaster_pid(cluster), *(t.pooler_pid for t in targets.values() if t.pooler_pid)]
            for rnd in range(args.rounds):
                for key in chosen:
                    if key == LEASE:
                        ded_us, hand_us, alone_us = side_by_side(
                            targets[DEDICATED],
                            targets[HANDOFF],
                            args.duration,
                            servers,
                        )
                        leases.append(
                            {
                                "round": rnd,
                                "dedicated_us": ded_us,
                                "handoff_us": hand_us,
                                "alone_us": alone_us,
                            }
                        )
                        print(
                            f"round {rnd + 1} {LEASE:8} dedicated {ded_us:7.1f} us  handoff {hand_us:7.1f} us"
                            f"  difference {hand_us - ded_us:+7.1f} us  alone {alone_us:5.1f} us",
                            file=sys.stderr,
                        )
                        continue
                    w = loads[key]
                    order = [n for n in names if not (n == POOLED and w.script == "connect")]
                    shift = rnd % len(order)
                    for name in order[shift:] + order[:shift]:
                        r: Run = _run(targets[name], w, args.duration, servers)
                        runs.append({"round": rnd, "workload": key, "target": name, **r._asdict()})
                        lat = f"{r.median_us:7.1f} us" if not math.isnan(r.median_us) else " " * 10
                        cpu = (
                            f"  pooler cpu/tx {r.cpu_user_us:6.1f} us user {r.cpu_sys_us:6.1f} us sys"
                            if not math.isnan(r.cpu_user_us)
                            else ""
                        )
                        print(
                            f"round {rnd + 1} {key:8} {name:16} {r.rate:10.0f} {w.unit:6} {lat}{cpu}",
                            file=sys.stderr,
                        )
    finally:
        cluster.destroy()
    return {"meta": meta, "targets": names, "runs": runs, "lease": leases}


def _run(target: Target, workload: Workload, duration: float, servers: list[int]) -> Run:
    """One run; a one-client run with PostgreSQL and the poolers on the last CPU and the client on the
    first, as on separate hosts. Unpinned, one client's rate moved by a fifth from run to run with
    whether the scheduler put it on its backend's CPU (every target alike, but not in step)."""
    if workload.procs * workload.threads != 1:
        return run(target, workload, duration)
    with servers_pinned(servers) as client_cpu:
        return run(target, workload, duration, client_cpu)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    all_loads = [*workloads(8, 4), LEASE]
    p.add_argument(
        "--workloads",
        default=",".join(all_loads),
        help=f"comma-separated names or numbers 1-5 (default: all: {','.join(all_loads)})",
    )
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: all)")
    p.add_argument(
        "--no-pgbouncer", action="store_true", help="leave PgBouncer out (ratios normalize to dedicated)"
    )
    p.add_argument("--procs", type=int, default=8, help="processes in the concurrent workloads (default 8)")
    p.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    p.add_argument(
        "--pool",
        type=int,
        default=POOL,
        help=f"PgBouncer's pool and the broker's --max-size (default {POOL}); as many as the clients "
        "(--pool 32) shows the cost of a transaction with no wait for a backend",
    )
    p.add_argument(
        "--json", default=os.path.join(HERE, "results", "coordinator.json"), help="JSON output path"
    )
    p.add_argument(
        "--png",
        default=os.path.join(os.path.dirname(HERE), "docs", "coordinator.png"),
        help="chart path ('' for none)",
    )
    p.add_argument(
        "--replot", metavar="JSON", help="print the table and draw the chart of an earlier run's JSON"
    )
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            data = _nan(json.load(f))
        data["summary"] = summarize(data)
        print(report(data, data["summary"]))
        if args.png:
            chart(data, data["summary"], args.png)
            print(f"chart: {args.png}", file=sys.stderr)
        return 0
    chosen = []
    for item in args.workloads.split(","):
        key = all_loads[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(all_loads) else item
        if key not in all_loads:
            p.error(
                f"--workloads: unknown {item!r}; choose from {', '.join(all_loads)} or 1-{len(all_loads)}"
            )
        chosen.append(key)
    names = [n.strip() for n in args.targets.split(",")]
    if bad := [n for n in names if n not in TARGETS]:
        p.error(f"--targets: unknown {bad}; choose from {', '.join(TARGETS)}")
    if args.no_pgbouncer and BOUNCER in names:
        names.remove(BOUNCER)
    if DEDICATED not in names:
        names.insert(0, DEDICATED)  # the floor every ratio and the lease difference need
    names = [n for n in TARGETS if n in names]
    data = measure(args, chosen, names)
    data["summary"] = summarize(data)
    print(report(data, data["summary"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_finite(data), f, indent=1, allow_nan=False)
        print(f"\nJSON: {args.json}", file=sys.stderr)
    if args.png:
        chart(data, data["summary"], args.png)
        print(f"chart: {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
