"""Clients of another uid on the Unix sockets (issue #13, access control): refused unless
``--allow-uid``/``--allow-gid`` lets them in, and then only as PostgreSQL clients through the proxy
(no backend fds, no admin console). The socket directory and the table are never readable by others.

The clients run as ``nobody`` (setpriv): the tests need root.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

from broker_process import CLAIMS, BrokerProcess
from other_user import as_other_user
from pgreuse.shm import table_path
from pgreuse.wire import control

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as another uid: needs root")

EXTRA_GID = 4242  # a group nobody is not in, given as a supplementary group by setpriv


@pytest.fixture
def start(pg, short_tmp):  # type: ignore[no-untyped-def]
    started: list[BrokerProcess] = []

    def make(*args: str) -> BrokerProcess:
        b = BrokerProcess(pg.dsn(), short_tmp, 6432 + len(started), ["--max-size", "2", *args])
        started.append(b)
        return b.start()

    yield make
    for b in started:
        b.stop()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def table_of(b: BrokerProcess) -> str:
    return table_path(b.socket_dir, b.port)


def test_by_default_only_the_brokers_user_gets_in_and_nothing_is_readable_by_others(start, short_tmp):
    os.chmod(short_tmp, 0o755)  # an existing directory readable by all: the broker closes it
    b = start()
    assert mode(short_tmp) == 0o700
    assert mode(os.path.join(short_tmp, f".s.PGSQL.{b.port}")) == 0o600
    assert mode(b.control_socket) == 0o600
    assert mode(table_of(b)) == 0o600
    assert "mode 755 -> 700 (no other user is allowed in)" in b.log()
    refused = as_other_user(b, "psycopg")
    assert "Permission denied" in refused["error"], refused  # the directory stops it: 0700
    assert "Permission denied" in as_other_user(b, "control")["error"]
    refused = as_other_user(b, "pgreuse")  # pgreuse says what to do
    assert "does not let this user (uid 65534) in" in refused["error"], refused
    assert "--allow-uid 65534" in refused["error"]


def test_a_user_not_allowed_is_told_who_it_is_and_which_setting_lets_it_in(start, short_tmp):
    b = start("--allow-uid", "postgres")  # the directory is open to others, nobody is not allowed
    refused = as_other_user(b, "psycopg")
    assert "uid 65534 (nobody) may not use this broker" in refused["error"], refused
    assert "--allow-uid 65534" in refused["error"]
    answer = as_other_user(b, "control")  # the control channel says the same in a Deny
    assert answer.get("fds") == 0, answer
    assert len(answer["messages"]) == 1 and "Deny(" in answer["messages"][0], answer
    assert "uid 65534 (nobody) may not use this broker" in answer["messages"][0]
    assert "connection from uid 65534 refused" in b.log()
    assert "control channel from uid 65534 refused" in b.log()


def test_allow_uid_lets_another_user_in_through_the_proxy(start, short_tmp):
    b = start("--allow-uid", "nobody,12345", "--allow-uid", "54321")
    assert mode(short_tmp) == 0o711  # others may reach the sockets, never list the directory
    assert mode(b.control_socket) == 0o666
    assert mode(table_of(b)) == 0o600
    assert as_other_user(b, "psycopg") == {"row": ["postgres", 42]}
    assert as_other_user(b, "pgreuse") == {"rows": [0, 1, 2, 9]}
    # Another user gets no backend fds (whoever holds one can read any session on it) and may
    # claim nothing: its Welcome names no holder.
    answer = as_other_user(b, "control")
    assert answer["fds"] == 0, answer
    assert answer["messages"] and "Welcome(" in answer["messages"][0], answer
    assert "holder=0" in answer["messages"][0]
    # ... and no admin console (SHUTDOWN, PAUSE).
    refused = as_other_user(b, "psycopg", dbname="pgreuse")
    assert "admin console is for the broker's own user and root only" in refused["error"], refused
    assert b.proc.poll() is None


@pytest.mark.skipif(not CLAIMS, reason="PGREUSE_PURE_PYTHON=1: nobody gets backend fds")
def test_the_brokers_own_user_still_gets_backend_fds(start):
    b = start("--allow-uid", "nobody")
    with b.connect(autocommit=True) as conn:  # a backend is open
        conn.execute("select 1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(b.control_socket)
        s.send(control.encode(control.Hello(control.VERSION, os.getpid())))
        welcome = control.decode(s.recv(4096))
        assert isinstance(welcome, control.Welcome) and welcome.holder != 0
        _data, fds, _flags, _addr = socket.recv_fds(s, 4096, 4)
        for fd in fds:
            os.close(fd)
        assert fds


def test_allow_gid_lets_a_supplementary_group_in(start, short_tmp):
    b = start("--allow-gid", str(EXTRA_GID))
    assert mode(short_tmp) == 0o711  # its group is root's, not the allowed one: others get x
    assert as_other_user(b, "psycopg", groups=str(EXTRA_GID)) == {"row": ["postgres", 42]}
    refused = as_other_user(b, "psycopg")  # nobody without that group
    assert "may not use this broker" in refused["error"], refused


def test_allow_gid_lets_a_primary_group_in(start):
    b = start("--allow-gid", "nogroup")
    assert as_other_user(b, "pgreuse") == {"rows": [0, 1, 2, 9]}


def test_a_directory_of_the_allowed_group_is_opened_to_that_group_only(start, short_tmp):
    os.chown(short_tmp, 0, EXTRA_GID)
    b = start("--allow-gid", str(EXTRA_GID))
    assert mode(short_tmp) == 0o710  # the group may reach the sockets; others may not even that
    assert as_other_user(b, "psycopg", groups=str(EXTRA_GID)) == {"row": ["postgres", 42]}
    assert "Permission denied" in as_other_user(b, "psycopg")["error"]
