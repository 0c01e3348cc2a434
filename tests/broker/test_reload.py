"""SIGHUP and RELOAD against a real broker: sizes and timeouts change live, no client is dropped, a
lower --max-size closes idle backends and lets a lent one finish, a bad file changes nothing."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg
import pytest

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
    finally:
        t.close()
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


def test_reload_without_a_file_says_there_is_nothing_to_read(broker):
    with broker.console() as admin:
        notices: list[str] = []
        admin.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        admin.execute("RELOAD")
    assert any("without --config-file" in n for n in notices), notices
