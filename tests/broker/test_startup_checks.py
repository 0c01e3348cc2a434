"""What the broker checks before it serves anyone: its directory, and who else is there."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from broker_process import BrokerProcess
from pgreuse.wire.states import SlotState


def test_a_socket_dir_others_can_write_is_refused(pg):
    d = tempfile.mkdtemp(prefix="pgr-", dir="/tmp")
    try:
        os.chmod(d, 0o777)  # anyone could plant a socket here and pose as the broker
        with pytest.raises(RuntimeError, match=r"mode 777.*writable by it\s+alone") as info:
            BrokerProcess(pg.dsn(), d, 6432).start()
        assert "exited with 2" in str(info.value)
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def test_an_unwritable_socket_dir_is_named(pg, short_tmp):
    broker = BrokerProcess(pg.dsn(), short_tmp, 6432, ["--socket-dir", "/proc/self"])
    broker.log_path = os.path.join(short_tmp, "broker.log")
    with pytest.raises(RuntimeError, match=r"--socket-dir '/proc/self'"):
        broker.start()


def test_a_second_broker_on_the_same_port_leaves_the_first_alone(make_broker, pg):
    first = make_broker("--max-size", "2", "--min-size", "1")
    with first.connect(autocommit=True) as conn:
        conn.execute("select 1")
    # (A lease through the proxy reaches the table's counters up to pool.TABLE_LAG late: every
    # transaction goes through it in the pure-Python build.)
    before = first.wait_for(lambda s: s.counters["leases"] >= 1, what="the lease counted")
    second = subprocess.run(
        [sys.executable, "-m", "pgreuse.broker", "--dsn", pg.dsn(), "--socket-dir",
         first.socket_dir, "--port", str(first.port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert second.returncode == 2
    assert "another broker is already listening" in second.stderr
    after = first.snapshot()
    assert after.broker_pid == before.broker_pid == first.proc.pid  # its table was not replaced
    assert after.counters["leases"] >= before.counters["leases"] >= 1
    with first.connect(autocommit=True) as conn:  # and it still serves
        assert conn.execute("select 2").fetchone() == (2,)
    first.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="the lease back")
