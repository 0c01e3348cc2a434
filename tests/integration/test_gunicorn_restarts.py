"""Gunicorn restarting under load loses no request: workers recycled by ``max_requests``, a ``HUP`` of
the master (its workers replaced, the broker told to re-read a smaller size), and a ``USR2`` binary
upgrade (a new master adopts the broker; the old one is WINCHed and QUIT). Every request gets a 200
without a retry, every acknowledged row is in the table, and PostgreSQL never sees more backends than
the largest --max-size."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

HERE = os.path.dirname(__file__)
APP_NAME = "pgreuse-restarts-test"
MAX_SIZE = 3


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Load:
    """Client threads sending requests back to back, each with a new id; no retries."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.acked: list[str] = []
        self.failures: list[str] = []
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for t in self._threads:
            t.join(60)

    def _run(self) -> None:
        while not self._done.is_set():
            ack = uuid.uuid4().hex
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", f"/?id={ack}", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
                if resp.status == 200 and body == ack:
                    self.acked.append(ack)
                else:
                    self.failures.append(f"{resp.status}: {body[:200]}")
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()

    def wait_for(self, more: int, timeout: float = 20) -> None:
        goal = len(self.acked) + more
        deadline = time.monotonic() + timeout
        while len(self.acked) < goal:
            assert time.monotonic() < deadline, f"the load stalled at {len(self.acked)}: {self.failures[:3]}"
            time.sleep(0.05)


class BackendSampler(threading.Thread):
    """The most backends of the broker PostgreSQL saw at once (pg_stat_activity, every 20 ms)."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.most = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._done.is_set():
                row = conn.execute(
                    "select count(*) from pg_stat_activity where application_name = %s", (APP_NAME,)
                ).fetchone()
                assert row is not None
                self.most = max(self.most, int(row[0]))
                self.samples += 1
                time.sleep(0.02)

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def _read_pid(path: str, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            assert time.monotonic() < deadline, f"no pid in {path}"
            time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait(cond: Callable[[], bool], what: str, log: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            with open(log, errors="replace") as f:
                pytest.fail(f"timed out waiting for {what}; gunicorn's log ends with:\n{f.read()[-6000:]}")
        time.sleep(0.05)


def _broker_max_size(short_tmp: str) -> str:
    with psycopg.connect(f"host={short_tmp} port=6432 dbname=pgreuse", autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as admin:  # fmt: skip
        rows = admin.execute("SHOW CONFIG").fetchall()
    return next(str(r[1]) for r in rows if r[0] == "max-size")


@pytest.mark.timeout(120)
def test_restarts_under_load_lose_no_request(pg, short_tmp):
    dsn = pg.dsn()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("drop table if exists acks; create table acks (id text primary key, worker int)")
    port = _free_port()
    size_file = os.path.join(short_tmp, "max_size")
    with open(size_file, "w") as f:
        f.write(str(MAX_SIZE))
    pidfile = os.path.join(short_tmp, "gunicorn.pid")
    log = os.path.join(short_tmp, "gunicorn.log")
    env = dict(os.environ, TEST_PG_DSN=pg.dsn(application_name=APP_NAME), TEST_SOCKET_DIR=short_tmp,
               TEST_BIND=f"127.0.0.1:{port}", TEST_PIDFILE=pidfile, TEST_MAX_SIZE_FILE=size_file)  # fmt: skip
    with open(log, "wb") as out:
        # The master re-executes this command line on USR2: the config path must be absolute.
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", os.path.join(HERE, "gunicorn_app", "restarts.conf.py"),
             "--chdir", os.path.join(HERE, "gunicorn_app"), "acks:app"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    sampler = BackendSampler(dsn)
    new_master = 0
    try:
        old_master = _read_pid(pidfile)
        assert old_master == proc.pid
        _wait(lambda: _answers(port), "gunicorn to serve", log)
        sampler.start()
        with Load(port) as load:
            load.wait_for(150)  # a few rounds of max_requests restarts (25-35 requests a worker)

            # HUP: new workers, and the broker re-reads a smaller size (applied live).
            with open(size_file, "w") as f:
                f.write(str(MAX_SIZE - 1))
            os.kill(old_master, signal.SIGHUP)
            _wait(lambda: _broker_max_size(short_tmp) == str(MAX_SIZE - 1), "the broker's new size", log)
            load.wait_for(100)

            # USR2: a new master (and its workers) beside the old one; it adopts the broker.
            os.kill(old_master, signal.SIGUSR2)
            new_master = _read_pid(pidfile + ".2")
            _wait(lambda: "adopted from master" in _text(log), "the adoption", log)
            load.wait_for(60)
            os.kill(old_master, signal.SIGWINCH)  # the old workers finish what they serve, and stop
            load.wait_for(60)
            os.kill(old_master, signal.SIGQUIT)
            _wait(lambda: proc.poll() is not None, "the old master to exit", log)
            load.wait_for(150)  # served by the new master's workers and the same broker
        sampler.stop()
        text = _text(log)
        assert not load.failures, f"{len(load.failures)} failed: {load.failures[:5]}\n{text[-4000:]}"
        assert "pgreuse broker left running for master" in text
        assert text.count("Autorestarting worker") >= 3 or "max requests" in text.lower()
        with psycopg.connect(dsn) as admin:
            stored = {r[0] for r in admin.execute("select id from acks")}
        missing = set(load.acked) - stored
        assert not missing, f"{len(missing)} acknowledged rows are not in the table"
        assert sampler.samples > 50
        assert 0 < sampler.most <= MAX_SIZE, f"PostgreSQL saw {sampler.most} backends (--max-size {MAX_SIZE})"
    finally:
        if sampler.is_alive():
            sampler.stop()
        for pid in (new_master, proc.pid):
            if pid and not _gone(pid):
                os.kill(pid, signal.SIGTERM)
        proc.wait(30)
        if new_master:
            _wait(lambda: _gone(new_master), "the new master to exit", log)
    # The new master stopped the broker it adopted: its sockets are gone.
    _wait(lambda: not any(n.startswith(".s.") for n in os.listdir(short_tmp)), "the broker to stop", log)


def _text(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"/?id=probe-{uuid.uuid4().hex}")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
