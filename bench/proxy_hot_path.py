"""Micro-benchmark: the broker's Python cost per proxied transaction, without PostgreSQL or pgbench.

Drives one :class:`~pgreuse.broker.proxy.ProxySession` and its :class:`~pgreuse.broker.pool.Pool`
in process over socketpairs: each transaction sends a Query from the "client", calls the session's
read callback, reads what reached the "backend", answers with a canned RowDescription, DataRow,
CommandComplete and ReadyForQuery (what ``pgbench -S`` gets), calls the backend's read callback and
reads what reached the client. So it times exactly the broker's per-transaction work (lease, forward,
scan, release) plus eight socket calls, with no scheduler noise from other processes: use it to
compare two versions of the hot path side by side, not as a throughput figure.

Usage::

    python bench/proxy_hot_path.py [--transactions 200000] [--clients 2]

With ``--clients 2`` (and a pool of one backend) every other request waits in the FIFO and is
served from the release of the previous transaction, as under load.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import sys
import tempfile
import time

from pgreuse.broker.backend_target import parse_target
from pgreuse.broker.config import BrokerConfig
from pgreuse.broker.pool import Pool
from pgreuse.broker.proxy import CORE, ProxySession, ProxyStats
from pgreuse.shm import Table, table_path
from pgreuse.wire.frames import frame
from pgreuse.wire.states import SlotState

QUERY = frame(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 4242;\0")
ANSWER = (
    frame(b"T", b"\0\x01abalance\0" + b"\0" * 6 + b"\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
    + frame(b"D", b"\0\x01\0\0\0\x010")
    + frame(b"C", b"SELECT 1\0")
    + frame(b"Z", b"I")
)


async def run(transactions: int, clients: int) -> float:
    d = tempfile.mkdtemp(prefix="pgr-hot-")
    config = BrokerConfig(dsn=f"host={d} port=1", socket_dir=d, port=6999, max_size=1, min_size=0)
    table = Table.create(table_path(d, 6999), max_size=1, min_size=0, wait_timeout=30.0,
                         database="bench", user="bench")  # fmt: skip
    pool = Pool(config, parse_target(f"host={d} port=1 user=bench dbname=bench"), table,
                asyncio.get_running_loop())  # fmt: skip
    server, backend_end = socket.socketpair()
    server.setblocking(False)
    b = pool.slots[0]
    b.generation, b.sock, b.pid = 1, server, 4242
    pool._transition(b, SlotState.CONNECTING, "bench")
    pool._transition(b, SlotState.IDLE, "bench")
    pool._make_idle(b)
    stats = ProxyStats()
    pairs = []
    for key in range(clients):
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        session = ProxySession(
            inner, pool, parking_key=key + 1, peer_pid=1, session_mode=False, stats=stats,
            user="bench", database="bench", application_name="", addr="unix",
        )  # fmt: skip
        session.start(b"")
        pairs.append((session, outer))
    sink = bytearray(65536)
    start = time.perf_counter()
    for _ in range(0, transactions, clients):
        # Every client asks; the first gets the backend, the others queue behind it.
        for session, outer in pairs:
            outer.send(QUERY)
            session._client_readable()
        for _session, outer in pairs:
            backend_end.recv_into(sink)
            backend_end.send(ANSWER)
            b.dispatch_readable()
            outer.recv_into(sink)
    elapsed = time.perf_counter() - start
    assert stats.xacts >= transactions, stats
    for session, outer in pairs:
        session.close()
        outer.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transactions", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="best of N (default 3)")
    args = p.parse_args(argv)
    rounds = []
    for _ in range(args.rounds):
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall = asyncio.run(run(args.transactions, args.clients))
        after = resource.getrusage(resource.RUSAGE_SELF)
        rounds.append((wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime))
    # Best of N by wall time; the user time is this process's work per transaction (both ends of
    # the fake sockets included: about 2.5 us of it is the benchmark's own socket calls).
    wall, user, system = (v / args.transactions * 1e6 for v in min(rounds))
    print(f"{wall:.2f} us per transaction, {user:.2f} us user + {system:.2f} us system CPU "
          f"({args.clients} clients, best of {args.rounds}, {CORE} session core)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
