"""``python -m pgreuse.demo``: pgreuse's main job, end to end, on a throwaway PostgreSQL.

It starts a PostgreSQL cluster in a temporary directory, a Gunicorn app with more workers x threads than
the broker has backends (the master starts the broker through pgreuse's hooks), drives HTTP requests
at it from many client threads, prints what was served and by how few backends, and cleans up.

This module is also the demo's WSGI app (``pgreuse.demo:app``): each request runs one transaction that
writes a row and reads a count, on a pgreuse connection opened lazily per worker thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

APP_NAME = "pgreuse-demo"
_local = threading.local()


# -- the WSGI app (runs in the Gunicorn workers) --------------------------------------------------


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    import pgreuse  # noqa: PLC0415 - imported in the worker, after fork

    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = pgreuse.connect(os.environ["PGREUSE_CONNINFO"])
    with conn.transaction():
        conn.execute("insert into demo_orders (worker, amount) values (%s, %s)", (os.getpid(), 42))
        row = conn.execute(
            "select count(*), pg_backend_pid() from demo_orders where worker = %s", (os.getpid(),)
        )
        (count, backend) = row.fetchone() or (0, 0)
        # Claimed in the shared-memory table (conn.lease), or through the broker's proxy when no
        # backend was idle (conn.proxied): either way one of the broker's backends.
        claimed = conn.lease is not None
    body = json.dumps({"worker": os.getpid(), "backend": backend, "claimed": claimed, "n": count}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


# -- the driver -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgreuse.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--workers", type=int, default=6, help="Gunicorn workers (default: %(default)s)")
    p.add_argument("--threads", type=int, default=4, help="threads per worker (default: %(default)s)")
    p.add_argument("--max-size", type=int, default=4, help="broker backends (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2000, help="HTTP requests (default: %(default)s)")
    p.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients (default: %(default)s)")
    args = p.parse_args(argv)

    import psycopg  # noqa: PLC0415

    from .devcluster import DevCluster  # noqa: PLC0415

    print("starting a throwaway PostgreSQL cluster ...", flush=True)
    cluster = DevCluster.create(max_connections=20)
    sockets = tempfile.mkdtemp(prefix="pgr-demo-", dir="/tmp")
    gunicorn: subprocess.Popen[bytes] | None = None
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("create table demo_orders (id serial primary key, worker int, amount int)")
        port = _free_port()
        env = dict(
            os.environ,
            PGREUSE_DSN=cluster.dsn(application_name=APP_NAME),
            PGREUSE_SOCKET_DIR=sockets,
            PGREUSE_PORT="6432",
            PGREUSE_MAX_SIZE=str(args.max_size),
            PGREUSE_LOG_LEVEL="WARNING",
        )
        cmd = [
            sys.executable, "-m", "gunicorn", "-c", "python:pgreuse.gunicorn",
            "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
            "--threads", str(args.threads), "--worker-class", "gthread",
            "--log-level", "warning", "pgreuse.demo:app",
        ]  # fmt: skip
        print(f"starting gunicorn: {args.workers} workers x {args.threads} threads, broker "
              f"--max-size {args.max_size} ...", flush=True)  # fmt: skip
        gunicorn = subprocess.Popen(cmd, env=env)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(url)
                break
            except OSError:
                if gunicorn.poll() is not None or time.monotonic() > deadline:
                    print("gunicorn did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.1)

        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            with psycopg.connect(cluster.dsn(), autocommit=True) as watcher:
                while not stop.is_set():
                    (n,) = watcher.execute(
                        "select count(*) from pg_stat_activity where application_name = %s",
                        (APP_NAME,),
                    ).fetchone() or (0,)
                    peak = max(peak, n)
                    time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        errors = 0

        def one(_: int) -> dict[str, Any] | None:
            nonlocal errors
            t = time.monotonic()
            try:
                answer = _get(url)
            except OSError:
                errors += 1
                return None
            answer["ms"] = (time.monotonic() - t) * 1000
            return answer

        print(f"sending {args.requests} requests from {args.clients} clients ...", flush=True)
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = [a for a in pool.map(one, range(args.requests)) if a is not None]
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()

        times_ms = [a["ms"] for a in answers]
        claimed = sum(1 for a in answers if a["claimed"])
        with psycopg.connect(cluster.dsn()) as admin:
            (rows,) = admin.execute("select count(*) from demo_orders").fetchone() or (0,)
        served = len(answers)
        print()
        print(f"requests served        {served} of {args.requests} ({errors} errors) "
              f"in {elapsed:.1f}s, {served / elapsed:.0f} req/s")  # fmt: skip
        print(f"app concurrency        {args.workers} workers x {args.threads} threads = "
              f"{args.workers * args.threads} threads, each with its own connection")  # fmt: skip
        print(f"workers that served    {len({a['worker'] for a in answers})}")
        print(f"backends used          {len({a['backend'] for a in answers})} distinct "
              f"(broker --max-size {args.max_size})")  # fmt: skip
        print(f"peak in pg_stat_activity {peak} (without pgreuse: {args.workers * args.threads}, "
              "one per thread)")  # fmt: skip
        print(f"transactions           {claimed} claimed a backend in the shared table, "
              f"{served - claimed} went through the broker's proxy (none was idle)")  # fmt: skip
        if times_ms:
            print(f"request time           p50 {statistics.median(times_ms):.1f} ms, "
                  f"p99 {_quantile(times_ms, 0.99):.1f} ms, max {max(times_ms):.1f} ms "
                  f"(mostly queueing: {args.clients} clients keep {args.workers * args.threads} "
                  f"threads busy on {args.max_size} backends)")  # fmt: skip
        print(f"rows committed         {rows} (one per request, plus the warm-up)")
        ok = served == args.requests and rows == served + 1 and peak <= args.max_size
        print("\nOK" if ok else "\nFAILED", flush=True)
        return 0 if ok else 1
    finally:
        if gunicorn is not None and gunicorn.poll() is None:
            gunicorn.send_signal(signal.SIGTERM)
            try:
                gunicorn.wait(30)
            except subprocess.TimeoutExpired:
                gunicorn.kill()
        cluster.destroy()
        shutil.rmtree(sockets, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
