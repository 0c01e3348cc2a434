"""``python -m pgreuse stats``: the pure view of a snapshot, and the CLI against a real broker."""

# ruff: noqa: F811 - the broker fixtures are imported here, and test arguments name them

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import pgreuse.__main__ as cli
from broker_process import broker, make_broker  # noqa: F401 - fixtures
from pgreuse import stats
from pgreuse.shm import COUNTERS, table_path
from pgreuse.snapshot import WAIT_BUCKETS, SlotRecord, Snapshot
from pgreuse.wire.states import CloseReason, SlotState

NOW_NS = 5_000_000_000_000


def _snapshot() -> Snapshot:
    counters = dict.fromkeys(COUNTERS, 0)
    counters.update(
        leases=100, waits=10, wait_ns=50_000_000, use_ns=2_000_000_000, timeouts=2,
        backends_opened=4, backends_closed=1, connect_ns=12_000_000, pending=3, max_pending=5,
        clients=6, parked=24,
    )  # fmt: skip
    hist = [0] * (len(WAIT_BUCKETS) + 1)
    hist[0] = 90  # <= 0.1 ms
    hist[WAIT_BUCKETS.index(0.005)] = 9
    hist[-1] = 1  # past the last bound
    slots = (
        SlotRecord(0, SlotState.LENT, CloseReason.NONE, False, 1, 4101, 777,
                   NOW_NS - 1_500_000_000, 60, 1_200_000_000, 1_700_000_000.0),
        SlotRecord(1, SlotState.IDLE, CloseReason.NONE, True, 1, 4102, 0, 0, 40, 800_000_000,
                   1_700_000_000.0),
        SlotRecord(2, SlotState.CLOSED, CloseReason.DIED_WHILE_LENT, False, 2, 0, 0, 0, 0, 0, 0.0),
    )  # fmt: skip
    reasons = {r.name.lower(): 0 for r in CloseReason if r is not CloseReason.NONE}
    reasons["died_while_lent"] = 1
    return Snapshot(
        broker_pid=4242, generation=1, max_size=3, min_size=1, started_at=1_700_000_000.0,
        wait_timeout=30.0, database="app", user="web", counters=counters, closed_by_reason=reasons,
        wait_histogram=tuple(hist), slots=slots,
    )  # fmt: skip


def test_summary_counts_quantiles_and_slots():
    s = stats.summarize(_snapshot(), stats.Clock(NOW_NS, 1_700_003_723.0), path="/x/t.shm")
    assert s["slots_by_state"] == {"idle": 1, "lent": 1, "connecting": 0, "resetting": 0, "closed": 1}
    assert s["uptime_seconds"] == 3723.0
    # 90 of 100 waits in the first bucket, 9 more by 5 ms, 1 open-ended.
    assert s["wait"]["quantiles"] == {"p50": 0.0001, "p90": 0.0001, "p99": 0.005}
    assert s["wait"]["histogram"][-1] == {"le": None, "count": 1}
    assert s["wait"]["mean_queued_seconds"] == pytest.approx(0.005)
    assert s["mean_use_seconds"] == pytest.approx(0.02)
    assert s["mean_connect_seconds"] == pytest.approx(0.003)
    lent, idle, closed = s["slots"]
    assert lent["held_seconds"] == pytest.approx(1.5)
    assert lent["holder_pid"] == 777 and lent["backend_pid"] == 4101
    assert idle["held_seconds"] is None and idle["holder_pid"] is None and idle["dirty"]
    assert closed["last_close_reason"] == "died_while_lent" and closed["backend_pid"] is None
    json.dumps(s)  # JSON-ready as is


def test_render_shows_holders_waits_and_close_reasons():
    text = stats.render(stats.summarize(_snapshot(), stats.Clock(NOW_NS, 1_700_003_723.0), path="/x/t.shm"))
    lines = text.splitlines()
    assert lines[0] == "pgreuse broker pid 4242  up 1h02m  db 'app' user 'web'"
    assert "pending 3 (peak 5)" in lines[2]
    row0 = next(line for line in lines if line.strip().startswith("0  lent"))
    assert row0.split() == ["0", "lent", "1", "4101", "777", "1.5s", "60", "1.2s"]
    assert "closed: died_while_lent" in next(line for line in lines if line.strip().startswith("2  closed"))
    assert "p50 <=100us  p90 <=100us  p99 <=5.0ms" in text
    assert "100 granted, 10 queued first (10.0%), 2 timed out" in text
    assert "closed   died_while_lent 1" in text


def test_render_says_when_the_broker_is_gone():
    s = stats.summarize(_snapshot(), stats.Clock(NOW_NS, 1_700_000_001.0), broker_alive=False)
    assert "NOT RUNNING" in stats.render(s).splitlines()[0]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2e-5, "20us"), (0.0123, "12.3ms"), (4.25, "4.2s"), (187, "3m07s"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_durations(seconds, text):
    assert stats.fmt_duration(seconds) == text


# -- the CLI against a real broker -----------------------------------------------------------------


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgreuse", *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def test_cli_shows_a_live_lease(broker):
    with broker.connect() as conn, conn.transaction():
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        out = _cli("stats", "--socket-dir", broker.socket_dir, "--port", str(broker.port))
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.split()[1:2] == ["lent"])
    assert str(pid) in row.split() and str(os.getpid()) in row.split()
    assert f"pgreuse broker pid {broker.proc.pid}" in out.stdout


def test_cli_json(broker):
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 1")
        conn.execute("select 2")
    broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="lease returned")
    out = _cli("stats", "--socket-dir", broker.socket_dir, "--port", str(broker.port), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["broker_pid"] == broker.proc.pid and data["broker_alive"] is True
    assert data["max_size"] == 2
    assert data["counters"]["leases"] >= 2
    assert data["path"] == table_path(broker.socket_dir, broker.port)


def test_cli_reads_the_table_of_a_wedged_broker(broker):
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 1")
    broker.wait_for(lambda s: s.count(SlotState.IDLE) >= 1, what="lease returned")
    os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker answers nothing now
    try:
        out = _cli("stats", "--socket-dir", broker.socket_dir, "--port", str(broker.port), timeout=30)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert out.returncode == 0, out.stderr
    assert "slots idle 1  lent 0" in out.stdout


def test_cli_without_a_broker_names_the_path_and_the_fix(short_tmp):
    out = _cli("stats", "--socket-dir", short_tmp, "--port", "6999")
    assert out.returncode == 1
    path = table_path(short_tmp, 6999)
    assert f"no pgreuse table at {path}" in out.stderr
    assert f"python -m pgreuse.broker --socket-dir {short_tmp} --port 6999" in out.stderr


def test_cli_rejects_a_file_that_is_not_a_table(short_tmp):
    with open(table_path(short_tmp, 6998), "wb") as f:
        f.write(b"x" * 4096)
    out = _cli("stats", "--socket-dir", short_tmp, "--port", "6998")
    assert out.returncode == 1
    assert "is not a pgreuse table" in out.stderr


def test_watch_follows_a_restarted_broker(make_broker):
    b = make_broker("--max-size", "1")
    out = io.StringIO()
    stop = threading.Event()
    result: list[int] = []

    def sleep(seconds: float) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # what Ctrl-C does to the CLI
        time.sleep(seconds)

    t = threading.Thread(
        target=lambda: result.append(
            cli.stats(b.socket_dir, b.port, as_json=True, watch=0.05, out=out, sleep=sleep)
        )
    )
    t.start()
    try:
        time.sleep(0.3)
        old_pid = b.proc.pid
        b.stop()  # a clean stop removes the table
        time.sleep(0.3)
        b.start()
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(10)
    assert result == [0]
    lines = out.getvalue().splitlines()
    pids = [json.loads(line)["broker_pid"] for line in lines if line.startswith("{")]
    assert pids[0] == old_pid and pids[-1] == b.proc.pid != old_pid
    assert any(line.startswith("no pgreuse table at") for line in lines)  # between stop and start
