"""Gunicorn with the pgreuse hooks, driven by real HTTP requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

HERE = os.path.dirname(__file__)
REQUESTS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _start(worker_class: str, pg, short_tmp):  # type: ignore[no-untyped-def]
    port = _free_port()
    env = dict(os.environ, TEST_PG_DSN=pg.dsn(), TEST_SOCKET_DIR=short_tmp,
               TEST_BIND=f"127.0.0.1:{port}")  # fmt: skip
    log = open(os.path.join(short_tmp, "gunicorn.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            os.path.join(HERE, "gunicorn_app", "gunicorn.conf.py"),
            "--chdir",
            os.path.join(HERE, "gunicorn_app"),
            "--worker-class",
            worker_class,
            "--threads",
            "4",
            # A gthread worker takes at most 4 clients at once, so the 16 concurrent requests
            # cannot all land on one worker (seen once in CI: one worker served all 120).
            "--worker-connections",
            "4",
            "app:app",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            _get(url)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                with open(os.path.join(short_tmp, "gunicorn.log")) as f:
                    pytest.fail(f"gunicorn did not come up:\n{f.read()[-5000:]}")
            time.sleep(0.1)


def _broker_pids(short_tmp: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"pgreuse.broker" in args and short_tmp.encode() in args:
            pids.append(int(entry))
    return pids


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_gunicorn_workers_share_the_brokers_backends(worker_class, pg, short_tmp):
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute("drop table if exists hits; create table hits (worker int)")
    proc, url = _start(worker_class, pg, short_tmp)
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: _get(url), range(REQUESTS)))
        assert len(answers) == REQUESTS
        assert len({a["backend"] for a in answers}) <= 2  # --max-size 2 for 4 workers x 4 threads
        assert len({a["worker"] for a in answers}) >= 2  # several workers really served
        with psycopg.connect(pg.dsn()) as admin:
            assert admin.execute("select count(*) from hits").fetchone() == (REQUESTS + 1,)
        assert _broker_pids(short_tmp), "the master did not start a broker"

        # The supervisor restarts a broker that dies; workers reconnect on their next request.
        supervisor = [p for p in _broker_pids(short_tmp) if _ppid(p) == proc.pid]
        assert len(supervisor) == 1, "the broker's supervisor must be a child of the master"
        (victim,) = [p for p in _broker_pids(short_tmp) if _ppid(p) == supervisor[0]]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        ok = 0
        while ok < 8:
            try:
                _get(url)
                ok += 1
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # On exit the master stops the broker, which removes its sockets.
    deadline = time.monotonic() + 10
    while _broker_pids(short_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _broker_pids(short_tmp) == []
    left = [n for n in os.listdir(short_tmp) if n.startswith(".s.")]
    if left:
        with open(os.path.join(short_tmp, "gunicorn.log"), errors="replace") as f:
            tail = f.read()[-6000:]
        raise AssertionError(f"the broker left {left} behind; the log ends with:\n{tail}")
