"""A broker whose uid has no passwd entry, or that is at its open-files limit, still serves clients.

Issue 13: the user-name lookup of the startup raised ``KeyError: getpwuid(): uid not found`` in a
task nobody awaited, so every client got "server closed the connection unexpectedly" — the usual case
in a container run with an arbitrary uid, and at the open-files limit (NSS cannot open its files).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import resource
import socket
import subprocess
import sys
from typing import NoReturn

import psycopg
import pytest

from broker_process import BrokerProcess
from pgreuse.broker.config import BrokerConfig
from pgreuse.broker.login import os_user
from pgreuse.broker.server import Broker
from pgreuse.wire import frames
from raw_client import RawClient

NO_ENTRY_UID = 54321


def no_entry_uid() -> int:
    uid = NO_ENTRY_UID
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def startup_answer(broker, user: str) -> dict[str, str] | None:  # type: ignore[no-untyped-def]
    """The FATAL fields the broker answers a StartupMessage for ``user`` with; None if it accepts."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(broker.socket_dir, f".s.PGSQL.{broker.port}"))
        s.sendall(frames.startup_message({"user": user, "database": broker.dbname}))
        reader = frames.FrameReader()
        while True:
            msg = reader.next_message()
            if msg is None:
                data = s.recv(65536)
                assert data, "the broker closed the connection without an answer"
                reader.feed(data)
                continue
            if msg.type == b"E":
                return frames.parse_error_fields(msg.body)
            if msg.type == b"Z":
                return None


@pytest.fixture
def no_login_env(monkeypatch):  # type: ignore[no-untyped-def]
    # getpass.getuser() reads these first: a container's environment usually has none of them.
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)


def test_the_lookup_of_a_uid_without_entry_gives_no_name():
    assert os_user(no_entry_uid()) is None
    assert os_user(os.geteuid()) == pwd.getpwuid(os.geteuid()).pw_name


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the broker as another uid: needs root")
def test_a_broker_whose_uid_has_no_passwd_entry(pg, short_tmp, no_login_env):
    uid = no_entry_uid()
    os.chmod(short_tmp, 0o711)  # the broker's uid must reach its socket directory inside
    socket_dir = os.path.join(short_tmp, "u")
    os.mkdir(socket_dir, 0o700)
    os.chown(socket_dir, uid, uid)
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    b = BrokerProcess(pg.dsn(), socket_dir, 6432, ["--max-size", "1"], wrapper=setpriv)
    b.start()
    try:
        client = RawClient(b)  # its startup used to die on getpwuid()
        client.close()
        with psycopg.connect(b.conninfo, user="postgres", autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        refused = startup_answer(b, "nobody_here")
        assert refused is not None and refused["C"] == "28000", refused
        assert "does not match" in refused["M"]
        assert "Traceback" not in b.log()
    finally:
        b.stop()


def test_a_startup_at_the_open_files_limit_is_answered(make_broker, no_login_env):
    b = make_broker("--max-size", "1")
    with psycopg.connect(b.conninfo, autocommit=True) as conn:  # the backend is open
        conn.execute("select 1")
    pid = b.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    # Leave the broker exactly one free descriptor: the client's accepted socket takes it.
    limit = next(n for n in range(1, soft) if n - len([f for f in open_fds if f < n]) == 1)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    try:
        assert startup_answer(b, "postgres") is None  # the pool's user: no lookup needed
        refused = startup_answer(b, "nobody_here")  # a lookup that fails (EMFILE): still answered
        assert refused is not None and refused["S"] == "FATAL", refused
        assert "Traceback" not in b.log()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    with psycopg.connect(b.conninfo, autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_an_unexpected_startup_failure_is_answered_with_fatal(short_tmp, caplog):
    # Any exception in a startup (a bug, a resource limit) reaches the client as a FATAL
    # ErrorResponse and the log, never a dropped connection in a task nobody awaits.
    async def main() -> bytes:
        broker = Broker(BrokerConfig(dsn=f"host={short_tmp} port=1 user=t dbname=t", socket_dir=short_tmp))

        async def planted(packet: object, peer_pid: int, authenticated: bool = False) -> NoReturn:
            raise RuntimeError("planted failure")

        broker._startup = planted  # type: ignore[method-assign]
        inner, outer = socket.socketpair()
        inner.setblocking(False)
        with outer:
            outer.sendall(frames.startup_message({"user": "t", "database": "t"}))
            await broker._serve_pg(inner)
            return outer.recv(65536)

    answer = asyncio.run(main())
    reader = frames.FrameReader()
    reader.feed(answer)
    msg = reader.next_message()
    assert msg is not None and msg.type == b"E"
    fields = frames.parse_error_fields(msg.body)
    assert (fields["S"], fields["C"]) == ("FATAL", "XX000")
    assert "planted failure" in fields["M"]
    assert "planted failure" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as another uid: needs root")
def test_a_dsn_without_user_under_a_uid_without_entry_is_a_config_error(short_tmp, no_login_env):
    # libpq's default user is the login name; with none to be had the broker says so at start.
    uid = no_entry_uid()
    os.chmod(short_tmp, 0o711)
    socket_dir = os.path.join(short_tmp, "u")
    os.mkdir(socket_dir, 0o700)
    os.chown(socket_dir, uid, uid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    out = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-m",
         "pgreuse.broker", "--dsn", f"host={short_tmp} dbname=x", "--socket-dir", socket_dir],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert f"uid {uid} has no user name" in out.stderr
    assert "Traceback" not in out.stderr
