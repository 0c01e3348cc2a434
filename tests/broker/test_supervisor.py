"""``python -m pgreuse.broker --supervise``: the supervisor that restarts a broker that dies.

A broker killed by a signal cannot remove its socket files; a SIGTERM that reached the supervisor
while it waited to restart one (seen in CI: Gunicorn stopping right after a broker was killed)
started no broker but left those files, which look alive to clients and to the next broker's check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pgreuse.client.channel import broker_accepts


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _start(pg, short_tmp) -> tuple[subprocess.Popen[bytes], int]:  # type: ignore[no-untyped-def]
    log = open(os.path.join(short_tmp, "supervisor.log"), "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgreuse.broker", "--supervise", "--socket-dir", short_tmp,
         "--port", "6432", "--max-size", "1", "--parent-pid", str(os.getpid())],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PGREUSE_DSN=pg.dsn()),
    )  # fmt: skip
    log.close()
    control = os.path.join(short_tmp, ".s.PGREUSE.6432")
    deadline = time.monotonic() + 30
    while not (broker_accepts(control) and _children(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "the broker did not come up"
        time.sleep(0.05)
    return proc, _children(proc.pid)[0]


def _socket_files(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".s."))


def test_sigterm_while_a_killed_broker_waits_to_restart_leaves_nothing(pg, short_tmp):
    proc, broker = _start(pg, short_tmp)
    try:
        os.kill(broker, signal.SIGKILL)
        time.sleep(0.2)  # the supervisor has reaped it and waits 0.5 s before the next one
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) != 0  # (the broker's exit: killed)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _socket_files(short_tmp) == []


def test_a_killed_broker_is_restarted_in_place(pg, short_tmp):
    proc, broker = _start(pg, short_tmp)
    try:
        os.kill(broker, signal.SIGKILL)
        control = os.path.join(short_tmp, ".s.PGREUSE.6432")
        deadline = time.monotonic() + 10
        while not (_children(proc.pid) and _children(proc.pid)[0] != broker and broker_accepts(control)):
            assert time.monotonic() < deadline, "no new broker"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _socket_files(short_tmp) == []
