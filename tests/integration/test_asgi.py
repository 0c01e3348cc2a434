"""The ASGI example under Gunicorn with uvicorn workers, driven by real HTTP requests."""

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

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "asgi")


def _get(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_starlette_on_uvicorn_workers_shares_two_backends(pg, short_tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PGREUSE_DSN=pg.dsn(), PGREUSE_SOCKET_DIR=short_tmp, PGREUSE_MAX_SIZE="2",
               BIND=f"127.0.0.1:{port}")  # fmt: skip
    log_path = os.path.join(short_tmp, "gunicorn.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
            cwd=EXAMPLE, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                warmup = [_get(url)]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(log_path) as f:
                        pytest.fail(f"gunicorn did not come up:\n{f.read()[-5000:]}")
                time.sleep(0.1)
        # The first answer means one worker is up; the load below is to be spread over several
        # (seen in CI: all of it went to the one worker that had booted), so wait for a second.
        while len({a["worker"] for a in warmup}) < 2 and time.monotonic() < deadline:
            with ThreadPoolExecutor(6) as ex:
                warmup += ex.map(lambda _: _get(url), range(6))
        with ThreadPoolExecutor(12) as ex:
            answers = list(ex.map(lambda _: _get(url), range(90)))
        with psycopg.connect(pg.dsn()) as admin:  # every visit committed, the warm-up ones too
            assert admin.execute("select count(*) from visits").fetchone() == (90 + len(warmup),)
        assert len({a["backend"] for a in answers}) <= 2
        assert len({a["worker"] for a in answers}) >= 2
        stats = _get(url + "stats")
        assert stats["pool_max"] == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
