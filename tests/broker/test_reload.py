"""SIGHUP and RELOAD against a real broker: sizes and timeouts change live, no client is dropped, a
lower --max-size closes idle backends and lets a lent one finish, a bad file changes nothing; the
auth file is read again and changed allow lists let users in or keep them out."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
import time

import psycopg
import pytest

import pgreuse
from other_user import as_other_user
from pgreuse.shm import Table, table_path
from pgreuse.wire.states import CloseReason, SlotState


def _open(snap) -> int:  # type: ignore[no-untyped-def]
    return sum(1 for s in snap.slots if s.state is not SlotState.CLOSED)


def _config(broker) -> dict[str, tuple[str, str]]:  # type: ignore[no-untyped-def]
    with broker.console() as admin:
        return {r["key"]: (r["value"], r["changeable"]) for r in admin.execute("SHOW CONFIG")}


def _logged(broker, text: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while text not in broker.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{broker.log()}"
        time.sleep(0.02)


def test_sighup_applies_new_sizes_without_dropping_a_client(make_broker, short_tmp):
    path = os.path.join(short_tmp, "pgreuse.toml")
    with open(path, "w") as f:
        f.write("max-size = 4\nmin-size = 1\nwait-timeout = 30\n")
    broker = make_broker("--config-file", path)
    conns = [broker.connect() for _ in range(4)]
    for c in conns:  # four transactions at once: four backends
        c.execute("begin")
        c.execute("select 1")
    broker.wait_for(lambda s: _open(s) == 4, what="four backends")
    for c in conns[1:]:
        c.commit()
    # conns[0] stays in its transaction (lent) across the reload.
    with open(path, "w") as f:
        f.write(
            "max-size = 2\nmin-size = 1\nwait-timeout = 5\nmax-client-conn = 50\nport = 7777\n"
            "pool-mode = 'session'\n"
        )
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    _logged(broker, "--max-size 4 -> 2")
    assert "--pool-mode changed from 'transaction' to 'session': it needs a restart" in broker.log()
    assert f"port = 7777 in {path} is overridden by the command line's --port" in broker.log()
    snap = broker.wait_for(lambda s: _open(s) <= 2, what="idle backends closed down to 2")
    assert snap.closed_by_reason["pool_shrunk"] >= 2
    # The lent one finished its transaction on its backend, and every client goes on.
    conns[0].execute("select 2")
    conns[0].commit()
    for c in conns:
        assert c.execute("select 3").fetchone() == (3,)
        c.commit()
    assert not any(c.closed for c in conns)
    config = _config(broker)
    assert config["max-size"] == ("2", "yes")
    assert config["wait-timeout"] == ("5.0", "yes")
    assert config["max-client-conn"] == ("50", "yes")
    assert config["port"] == (str(broker.port), "no")
    t = Table.open(table_path(broker.socket_dir, broker.port))
    try:
        assert t.wait_limit() == 5.0  # the table's queue (workers) sees it too
        assert t.limit() == 2
    finally:
        t.close()
    # What `pgreuse stats` and the pool metrics report: the sizes in force, not the start's.
    snap = broker.snapshot()
    assert (snap.max_size, snap.min_size, snap.wait_timeout) == (2, 1, 5.0)
    # Never more than two backends from now on, even with a third transaction waiting.
    conns[0].execute("select 1")
    conns[1].execute("select 1")
    waiter = threading.Thread(target=conns[2].execute, args=("select 1",))
    waiter.start()
    time.sleep(0.5)
    assert _open(broker.snapshot()) == 2
    conns[0].commit()
    waiter.join(10)
    assert not waiter.is_alive()
    assert _open(broker.snapshot()) == 2
    conns[1].commit()
    conns[2].commit()
    # A wait that times out names the --max-size in force.
    with open(path, "w") as f:
        f.write("max-size = 2\nmin-size = 1\nwait-timeout = 0.3\n")
    broker.proc.send_signal(signal.SIGHUP)
    _logged(broker, "--wait-timeout 5.0 -> 0.3")
    conns[0].execute("select 1")
    conns[1].execute("select 1")
    with pytest.raises(pgreuse.PoolTimeout, match="all 2 of --max-size"):
        conns[2].execute("select 1")
    conns[0].commit()
    conns[1].commit()
    for c in conns:
        c.close()


def test_a_bad_file_on_reload_keeps_the_settings_and_says_why(make_broker, short_tmp):
    path = os.path.join(short_tmp, "pgreuse.toml")
    with open(path, "w") as f:
        f.write("max-size = 3\n")
    broker = make_broker("--config-file", path)
    conn = broker.connect()
    with open(path, "w") as f:
        f.write("max-size = 'many'\n")
    with broker.console() as admin:
        with pytest.raises(
            psycopg.Error, match=r"reload failed, the settings in use stay: .*max-size = 'many'"
        ):
            admin.execute("RELOAD")
        assert admin.execute("SHOW CONFIG").fetchone() is not None
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    _logged(broker, "reload failed, the settings in use stay")
    assert broker.proc.poll() is None  # a bad reload never stops the broker
    assert _config(broker)["max-size"] == ("3", "yes")
    # Growing past the table's slots is refused with the reason; growing back up to them works.
    with open(path, "w") as f:
        f.write("max-size = 5\nmin-size = 2\n")
    with broker.console() as admin:
        notices: list[str] = []
        admin.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        admin.execute("RELOAD")
    assert any("more than the 3 slots" in n for n in notices), notices
    assert _config(broker)["max-size"] == ("3", "yes")
    assert _config(broker)["min-size"] == ("2", "yes")
    broker.wait_for(lambda s: _open(s) >= 2, what="min-size 2 opened")
    assert conn.execute("select 1").fetchone() == (1,)
    conn.close()
    assert CloseReason.POOL_SHRUNK.name.lower() in broker.snapshot().closed_by_reason


def test_reload_without_a_file_says_the_settings_stay(broker):
    with broker.console() as admin:
        notices: list[str] = []
        admin.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        admin.execute("RELOAD")
    assert any("without --config-file" in n for n in notices), notices


def _tcp_login(port: int, dbname: str, user: str, password: str) -> str | None:
    """Log in on the TCP listener: None if it worked, else the error."""
    try:
        with psycopg.connect(
            host="127.0.0.1", port=port, dbname=dbname, user=user, password=password,
            passfile="/nonexistent", sslmode="disable", connect_timeout=10,
        ) as conn:  # fmt: skip
            assert conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError as exc:
        return str(exc)
    return None


def _auth_file_and_port(short_tmp: str) -> tuple[str, int]:
    """An auth file with one user ("app"), and a free TCP port on loopback for the listener."""
    users = os.path.join(short_tmp, "userlist.txt")
    with open(users, "w") as f:
        f.write('"app" "app-Secret-1"\n')
    os.chmod(users, 0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return users, s.getsockname()[1]


def test_a_reload_reads_the_auth_file_again(make_broker, short_tmp):
    users, tcp_port = _auth_file_and_port(short_tmp)
    path = os.path.join(short_tmp, "pgreuse.toml")
    with open(path, "w") as f:
        f.write(f"listen-addr = '127.0.0.1:{tcp_port}'\nauth-file = '{users}'\n")
    broker = make_broker("--config-file", path)

    def login(user: str, password: str) -> str | None:
        return _tcp_login(tcp_port, broker.dbname, user, password)

    assert login("app", "app-Secret-1") is None
    assert 'authentication failed for user "new"' in (login("new", "new-Secret-2") or "")
    # The same path, new contents: a user added.
    with open(users, "a") as f:
        f.write('"new" "new-Secret-2"\n')
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    _logged(broker, f"reload: --auth-file {users} read again: 2 users")
    assert login("new", "new-Secret-2") is None
    assert login("app", "app-Secret-1") is None
    # A file that cannot be read (an md5 hash is refused) keeps the users in use, and says why.
    with open(users, "w") as f:
        f.write('"app" "md5' + "0" * 32 + '"\n')
    with (
        broker.console() as admin,
        pytest.raises(psycopg.Error, match=r"reload failed, the settings in use stay: --auth-file"),
    ):
        admin.execute("RELOAD")
    assert login("new", "new-Secret-2") is None
    assert _config(broker)["auth-file"] == (users, "yes")
    # Another file named in the settings: its users only.
    other = os.path.join(short_tmp, "other.txt")
    with open(other, "w") as f:
        f.write('"other" "other-Secret-3"\n')
    os.chmod(other, 0o600)
    with open(path, "w") as f:
        f.write(f"listen-addr = '127.0.0.1:{tcp_port}'\nauth-file = '{other}'\n")
    with broker.console() as admin:
        admin.execute("RELOAD")
    assert login("other", "other-Secret-3") is None
    assert "authentication failed" in (login("new", "new-Secret-2") or "")


def test_a_reload_without_a_settings_file_reads_the_auth_file_again(make_broker, short_tmp):
    users, tcp_port = _auth_file_and_port(short_tmp)
    broker = make_broker("--listen-addr", f"127.0.0.1:{tcp_port}", "--auth-file", users)
    with open(users, "a") as f:
        f.write('"new" "new-Secret-2"\n')
    with broker.console() as admin:
        admin.execute("RELOAD")
    _logged(broker, f"reload: --auth-file {users} read again: 2 users")
    assert _tcp_login(tcp_port, broker.dbname, "new", "new-Secret-2") is None
    assert _tcp_login(tcp_port, broker.dbname, "app", "app-Secret-1") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as another uid: needs root")
def test_a_reload_applies_changed_allow_lists(make_broker, short_tmp):
    path = os.path.join(short_tmp, "pgreuse.toml")
    with open(path, "w") as f:
        f.write("max-size = 2\n")
    broker = make_broker("--config-file", path)
    assert "Permission denied" in as_other_user(broker, "psycopg")["error"]  # the directory: 0700
    with open(path, "w") as f:
        f.write("max-size = 2\nallow-uid = 'nobody'\n")
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    _logged(broker, "--allow-uid '' -> 'nobody'")
    assert stat.S_IMODE(os.stat(short_tmp).st_mode) == 0o711
    assert stat.S_IMODE(os.stat(broker.control_socket).st_mode) == 0o666
    assert as_other_user(broker, "psycopg") == {"row": ["postgres", 42]}
    assert _config(broker)["allow-uid"] == ("nobody", "yes")
    # Taken back: the credential check refuses, and the directory is closed again.
    with open(path, "w") as f:
        f.write("max-size = 2\nallow-gid = 'nogroup'\n")
    with broker.console() as admin:
        admin.execute("RELOAD")
    assert as_other_user(broker, "psycopg") == {"row": ["postgres", 42]}  # its primary group now
    with open(path, "w") as f:
        f.write("max-size = 2\n")
    with broker.console() as admin:
        admin.execute("RELOAD")
    assert stat.S_IMODE(os.stat(short_tmp).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(broker.control_socket).st_mode) == 0o600
    assert "Permission denied" in as_other_user(broker, "psycopg")["error"]
