"""Benchmark: the pgreuse broker's proxy mode against PgBouncer, on one throwaway PostgreSQL.

Starts a :class:`~pgreuse.devcluster.DevCluster`, PgBouncer (transaction pooling) and a pgreuse broker
(transaction mode), both with 8 server connections to the same database, then runs pgbench against
PostgreSQL directly, PgBouncer and pgreuse, one after the other, for each workload: ``-S`` (select
only) with 1 and 16 clients, and the default TPC-B-like script with 1 and 16 clients. Prints a
markdown table (tps and average latency per target) and the pgreuse/PgBouncer throughput ratio, and a
second table with what decides that ratio on a machine where everything shares a few cores: the CPU
each pooler process spends per transaction (user and system time from ``/proc/<pid>/stat`` over the
run), and the latency each adds to a round trip over PostgreSQL direct.

The ratio is taken per round, from the two poolers' runs of that round (adjacent in time), and the
table shows the median over rounds: on a shared machine the speed of everything drifts from one
minute to the next, and a ratio of medians would mix runs minutes apart.

Needs ``pgbouncer`` (Debian: ``apt-get install pgbouncer``) and the PostgreSQL server binaries. As
root, PgBouncer runs as the ``postgres`` user (it refuses root), through ``runuser``.

Usage::

    python bench/proxy_vs_pgbouncer.py [--duration 10] [--rounds 3] [--pool-size 8] [--scale 1]
        [--mode simple]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import NamedTuple

from _harness import PGBOUNCER_PORT, PGREUSE_PORT, cpu_seconds, env, pgbouncer, pgreuse_broker

from pgreuse.devcluster import DevCluster, find_pg_bindir

WORKLOADS = (("select-only", 1), ("select-only", 16), ("tpcb-like", 1), ("tpcb-like", 16))


class Run(NamedTuple):
    tps: float
    latency_ms: float
    user_us: float  # the pooler's CPU per transaction (0 for PostgreSQL direct)
    system_us: float


def pgbench(
    target: tuple[str, int, int], cluster: DevCluster, script: str, clients: int, args: argparse.Namespace
) -> Run:
    """One pgbench run against ``target`` (host, port, pid of the pooler or 0)."""
    host, port, pid = target
    exe = os.path.join(find_pg_bindir(), "pgbench")
    cmd = [
        exe, "-h", host, "-p", str(port), "-U", cluster.superuser, "-n", "-b", script,
        "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(args.duration), "-M", args.mode,
        cluster.dbname,
    ]  # fmt: skip
    before = cpu_seconds(pid) if pid else (0.0, 0.0)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), check=False)
    after = cpu_seconds(pid) if pid else (0.0, 0.0)
    if out.returncode != 0 or "failed transactions: 0 " not in out.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    tps = re.search(r"tps = ([\d.]+)", out.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    assert tps and lat and processed, out.stdout
    n = max(1, int(processed.group(1)))
    return Run(
        float(tps.group(1)),
        float(lat.group(1)),
        (after[0] - before[0]) / n * 1e6,
        (after[1] - before[1]) / n * 1e6,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (default 10)")
    p.add_argument("--pool-size", type=int, default=8, help="server connections per pooler (default 8)")
    p.add_argument("--scale", type=int, default=1, help="pgbench -i scale factor (default 1)")
    p.add_argument("--mode", default="simple", choices=("simple", "extended"), help="pgbench -M")
    p.add_argument(
        "--rounds", type=int, default=3,
        help="runs per target and workload, in rotating order; the table shows medians (default 3)",
    )  # fmt: skip
    p.add_argument(
        "--workloads", default=",".join(f"{s}:{c}" for s, c in WORKLOADS),
        help="script:clients pairs, comma-separated (default: all four)",
    )  # fmt: skip
    args = p.parse_args(argv)
    workloads = []
    for item in args.workloads.split(","):
        script, _, clients = item.partition(":")
        if script not in ("select-only", "tpcb-like", "simple-update") or not clients.isdigit():
            p.error(f"--workloads {item!r}: use script:clients, e.g. select-only:1")
        workloads.append((script, int(clients)))
    cluster = DevCluster.create(max_connections=60)
    try:
        init = [os.path.join(find_pg_bindir(), "pgbench"), "-i", "-q", "-s", str(args.scale), cluster.dsn()]
        subprocess.run(init, check=True, capture_output=True, env=env())
        runs: dict[tuple[str, int], dict[str, list[Run]]] = {w: {} for w in workloads}
        with (
            pgbouncer(cluster, args.pool_size) as (bdir, bpid),
            pgreuse_broker(cluster, args.pool_size) as (rdir, rpid),
        ):
            targets = {
                "postgres": (cluster.socket_dir, cluster.port, 0),
                "pgbouncer": (bdir, PGBOUNCER_PORT, bpid),
                "pgreuse": (rdir, PGREUSE_PORT, rpid),
            }
            names = list(targets)
            for script, clients in workloads:
                for round_ in range(args.rounds):
                    # Rotate the order: a machine that slows down during a round does not always
                    # penalize the same target.
                    for name in names[round_ % 3 :] + names[: round_ % 3]:
                        r = pgbench(targets[name], cluster, script, clients, args)
                        runs[(script, clients)].setdefault(name, []).append(r)
                        print(
                            f"{script:12} c={clients:<3} {name:10} {r.tps:10.0f} tps {r.latency_ms:7.3f} ms"
                            f"  cpu/tx {r.user_us:5.1f} us user {r.system_us:5.1f} us sys",
                            file=sys.stderr,
                        )
    finally:
        cluster.destroy()
    print(
        f"\npgbench -M {args.mode}, {args.duration}s per run, {args.rounds} rounds, scale "
        f"{args.scale}, pool size {args.pool_size}, {os.cpu_count()} CPUs; medians over rounds\n"
    )
    print("| workload | clients | PostgreSQL direct | PgBouncer | pgreuse proxy | pgreuse / PgBouncer |")
    print("|---|---:|---:|---:|---:|---:|")
    for (script, clients), by_name in runs.items():
        cells = [
            f"{statistics.median(r.tps for r in by_name[n]):,.0f} tps, "
            f"{statistics.median(r.latency_ms for r in by_name[n]):.3f} ms"
            for n in targets
        ]
        ratio = statistics.median(
            a.tps / b.tps for a, b in zip(by_name["pgreuse"], by_name["pgbouncer"], strict=True)
        )
        print(f"| {script} | {clients} | {' | '.join(cells)} | {ratio:.2f}x |")
    print(
        "\nPer transaction: the pooler's CPU (user + system); the latency it adds to PostgreSQL direct,"
        "\nand pgreuse's latency minus PgBouncer's (medians of the differences within each round:"
        "\nthe machine's speed drifts between rounds more than these differences)\n"
    )
    print(
        "| workload | clients | PgBouncer CPU | pgreuse CPU | PgBouncer adds | pgreuse adds "
        "| pgreuse - PgBouncer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")

    def added_us(by_name: dict[str, list[Run]], name: str, base: str) -> str:
        pairs = zip(by_name[name], by_name[base], strict=True)
        return f"{statistics.median(a.latency_ms - b.latency_ms for a, b in pairs) * 1000:+.0f} us"

    for (script, clients), by_name in runs.items():
        cells = [
            f"{statistics.median(r.user_us for r in by_name[n]):.1f} + "
            f"{statistics.median(r.system_us for r in by_name[n]):.1f} us"
            for n in ("pgbouncer", "pgreuse")
        ] + [
            added_us(by_name, "pgbouncer", "postgres"),
            added_us(by_name, "pgreuse", "postgres"),
            added_us(by_name, "pgreuse", "pgbouncer"),
        ]
        print(f"| {script} | {clients} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
