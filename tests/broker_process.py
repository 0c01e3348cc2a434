"""A real broker process for tests: started with ``python -m pgreuse.broker``, stopped or killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

import pgreuse
from pgreuse.client import hot
from pgreuse.client.channel import broker_accepts
from pgreuse.shm import Table, TableError, table_path
from pgreuse.slots import ATOMIC, NOBODY
from pgreuse.snapshot import Snapshot
from pgreuse.wire.states import SlotState


class BrokerProcess:
    def __init__(
        self, dsn: str, socket_dir: str, port: int, args: Sequence[str] = (), wrapper: Sequence[str] = ()
    ) -> None:
        self.dsn = dsn
        self.socket_dir = socket_dir
        self.port = port
        self.args = list(args)
        self.wrapper = list(wrapper)  # a command the broker runs under (e.g. setpriv to another uid)
        self.log_path = os.path.join(socket_dir, f"broker.{port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.dbname = str(conninfo_to_dict(dsn).get("dbname") or "postgres")

    @property
    def conninfo(self) -> str:
        return f"host={self.socket_dir} port={self.port} dbname={self.dbname}"

    @property
    def control_socket(self) -> str:
        return os.path.join(self.socket_dir, f".s.PGREUSE.{self.port}")

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        cmd = [
            *self.wrapper, sys.executable, "-m", "pgreuse.broker",
            "--socket-dir", self.socket_dir, "--port", str(self.port), "--log-level", "DEBUG",
            # A test process killed mid-run (a timeout) must not leave brokers behind.
            "--parent-pid", str(os.getpid()),
            *self.args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        # The DSN in the environment, as the Gunicorn hook passes it: a command line is public.
        env = dict(os.environ, PGREUSE_DSN=self.dsn)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            # Ready: it accepts, and its own table is in place (the listeners come first, so a
            # test could otherwise read no table, or a table a killed broker left behind).
            if broker_accepts(self.control_socket) and self._table_pid() == self.proc.pid:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"broker not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    def connect(self, **kwargs: object) -> pgreuse.Connection:
        conn = pgreuse.connect(self.conninfo, **kwargs)  # type: ignore[arg-type]
        self.settle()
        return conn

    def console(self) -> psycopg.Connection[Any]:
        """A connection to the admin console. It speaks the simple protocol only, like PgBouncer's:
        psycopg's ClientCursor uses it."""
        return psycopg.connect(
            f"host={self.socket_dir} port={self.port} dbname=pgreuse",
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
            row_factory=dict_row,  # type: ignore[arg-type]
        )

    def settle(self, timeout: float = 2.0) -> None:
        """Give the broker a moment to share its idle backends with the workers (it does within
        SHARE_LAG of their last use, or of a reset, once some worker process has a control channel
        open), so a test's next transaction claims one instead of going through the proxy. No error
        if it does not: a test may hold a backend."""
        t = Table.open(table_path(self.socket_dir, self.port))
        try:
            if not t.claims:
                return
            start = time.monotonic()
            while time.monotonic() < start + timeout:
                snap = t.snapshot()
                if not snap.counters["clients"]:
                    return  # nobody to share with: the broker keeps its backends
                held = [s for s in snap.slots if s.state is not SlotState.CLOSED and s.holder != NOBODY]
                # Idle in the broker, connecting, resetting: shared soon. Lent: maybe on its way
                # back (a dirty release the broker has not read yet), or a test holds it: a moment.
                if not held or (
                    time.monotonic() > start + 0.2 and all(s.state is SlotState.LENT for s in held)
                ):
                    return
                time.sleep(0.005)
        finally:
            t.close()

    def _table_pid(self) -> int:
        try:
            return self.snapshot().broker_pid
        except (OSError, TableError):  # not there yet, or not whole yet
            return 0

    def snapshot(self) -> Snapshot:
        t = Table.open(table_path(self.socket_dir, self.port))
        try:
            return t.snapshot()
        finally:
            t.close()

    def wait_for(self, predicate: object, timeout: float = 10.0, what: str = "condition") -> Snapshot:
        """Poll the shared-memory table until ``predicate(snapshot)`` holds."""
        deadline = time.monotonic() + timeout
        snap = self.snapshot()
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if predicate(snap):  # type: ignore[operator]
                return snap
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; last table: {snap}\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"broker ignored SIGTERM for {timeout}s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- fixtures (imported by the conftest.py of the test folders that need a broker) -------------------

import pytest  # noqa: E402


@pytest.fixture
def make_broker(pg, short_tmp):  # type: ignore[no-untyped-def]
    """Start brokers on the shared cluster: ``make_broker("--max-size", "1", dsn=...)``."""
    started: list[BrokerProcess] = []

    def make(*args: str, dsn: str | None = None, port: int = 6432) -> BrokerProcess:
        b = BrokerProcess(dsn or pg.dsn(), short_tmp, port + len(started), args)
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(make_broker):  # type: ignore[no-untyped-def]
    """A broker with two backends on the shared cluster."""
    return make_broker("--max-size", "2")


# Whether workers claim backends in this run: not with PGREUSE_PURE_PYTHON=1 (or without the C
# module), where every transaction goes through the broker's proxy.
CLAIMS = ATOMIC


def held(conn: object) -> bool:
    """``conn`` is inside a transaction that holds a backend: a claimed one, or one the broker's proxy
    lent it."""
    return getattr(conn, "lease", None) is not None or bool(getattr(conn, "proxied", False))


# A test of what happens to a claimed backend (its fd in a worker, its slot word): it runs wherever
# workers claim, that is everywhere but the PGREUSE_PURE_PYTHON=1 leg, whose transactions all go
# through the proxy (the proxy's own fault tests cover that path there).
needs_claims = pytest.mark.skipif(
    not CLAIMS, reason="PGREUSE_PURE_PYTHON=1: nothing is claimed, every transaction goes through the proxy"
)


@pytest.fixture(params=["c", "python"])
def lease_path(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Run the test with the C hot path of the lease (``pgreuse._slots.Hot``) and without it (the
    Python path alone, its reference): what a user sees must be the same."""
    if request.param == "python":
        monkeypatch.setattr(hot, "for_connection", lambda conn, channel: hot.COLD)
    return request.param
