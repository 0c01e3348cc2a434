"""What the benchmarks share: PgBouncer and a pgreuse broker started next to a throwaway PostgreSQL,
and the CPU time a process has spent (``/proc/<pid>/stat``).

Imported by ``bench/proxy_vs_pgbouncer.py`` and ``bench/coordinator.py``; run those as scripts
(``python bench/<name>.py``), which puts this directory on ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from pgreuse.devcluster import DevCluster

PGBOUNCER_PORT = 6440
PGREUSE_PORT = 6441


def env() -> dict[str, str]:
    """This process's environment without ``PG*`` variables (they would redirect libpq tools)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def wait_socket(path: str, what: str, log: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    with open(log, errors="replace") as f:
        tail = f.read()[-3000:]
    raise RuntimeError(f"{what} did not create {path} within {timeout}s; its log:\n{tail}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of process ``pid`` so far (``/proc/<pid>/stat`` fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _print_log(what: str, log: str) -> None:
    try:
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
    except OSError:
        return
    if tail:
        print(f"--- the end of {what}'s log ({log}) ---\n{tail}", file=sys.stderr)


def pgbouncer_exe() -> str:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(exe):
        raise SystemExit("pgbouncer not found: apt-get install pgbouncer (Debian/Ubuntu)")
    return exe


@contextmanager
def pgbouncer(cluster: DevCluster, pool_size: int, port: int = PGBOUNCER_PORT) -> Iterator[tuple[str, int]]:
    """PgBouncer in transaction mode in front of ``cluster``: yields (socket dir, PgBouncer's pid).

    As root, PgBouncer runs as the ``postgres`` user (it refuses root), through ``runuser``.
    """
    exe = pgbouncer_exe()
    d = tempfile.mkdtemp(prefix="pgb-", dir="/tmp")
    as_root = os.geteuid() == 0
    with open(os.path.join(d, "userlist.txt"), "w") as f:
        f.write(f'"{cluster.superuser}" ""\n')
    with open(os.path.join(d, "pgbouncer.ini"), "w") as f:
        f.write(
            f"""[databases]
{cluster.dbname} = host={cluster.socket_dir} port={cluster.port} dbname={cluster.dbname} \
user={cluster.superuser}

[pgbouncer]
listen_addr =
listen_port = {port}
unix_socket_dir = {d}
auth_type = trust
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = {pool_size}
max_client_conn = 200
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
admin_users = {cluster.superuser}
"""
        )
    if as_root:
        shutil.chown(d, "postgres")
        for name in os.listdir(d):
            shutil.chown(os.path.join(d, name), "postgres")
    cmd = [exe, os.path.join(d, "pgbouncer.ini")]
    if as_root:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    log = os.path.join(d, "stdout.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env())
    try:
        wait_socket(os.path.join(d, f".s.PGSQL.{port}"), "pgbouncer", log)
        with open(os.path.join(d, "pgbouncer.pid")) as f:
            pid = int(f.read().strip())
        yield d, pid
    except Exception:
        _print_log("pgbouncer", os.path.join(d, "pgbouncer.log"))
        raise
    finally:
        # As root, proc is runuser, which does not pass signals on: stop PgBouncer by its pidfile.
        try:
            with open(os.path.join(d, "pgbouncer.pid")) as f:
                os.kill(int(f.read().strip()), signal.SIGINT)
        except (OSError, ValueError):
            proc.send_signal(signal.SIGINT)
        _wait_or_kill(proc, 10)
        shutil.rmtree(d, ignore_errors=True)


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a process told to stop; kill it if it has not within ``timeout`` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def pgreuse_broker(
    cluster: DevCluster, pool_size: int, port: int = PGREUSE_PORT
) -> Iterator[tuple[str, int]]:
    """A broker with ``--max-size`` and ``--min-size`` ``pool_size``: yields (socket dir, its pid).

    Clients connect with ``host=<socket dir> port=<port>``: pgreuse connections lease through it,
    any other client is proxied.
    """
    d = tempfile.mkdtemp(prefix="pgr-b-", dir="/tmp")
    log = os.path.join(d, "broker.log")
    cmd = [
        sys.executable, "-m", "pgreuse.broker", "--dsn", cluster.dsn(), "--socket-dir", d,
        "--port", str(port), "--max-size", str(pool_size), "--min-size", str(pool_size),
        "--log-level", "WARNING",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_socket(os.path.join(d, f".s.PGREUSE.{port}"), "the pgreuse broker", log)
        yield d, proc.pid
    except Exception:
        _print_log("the broker", log)
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        _wait_or_kill(proc, 20)
        shutil.rmtree(d, ignore_errors=True)


def postmaster_pid(cluster: DevCluster) -> int:
    """The pid of ``cluster``'s postmaster (the first line of ``postmaster.pid``)."""
    with open(os.path.join(cluster.datadir, "postmaster.pid"), encoding="ascii") as f:
        return int(f.readline())


def _family(root: int) -> list[int]:
    """``root`` and every process whose parent is in the family (PostgreSQL's backends under its
    postmaster), read from ``/proc``."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    family = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in family and pid not in family:
                family.add(pid)
                grew = True
    return sorted(family)


@contextmanager
def servers_pinned(roots: list[int]) -> Iterator[int]:
    """Pin the processes under ``roots`` (PostgreSQL's postmaster, the poolers) to this process's
    last CPU for the block, and put their CPU sets back after; yields the CPU the client should pin
    itself to (:func:`pin_self`), or -1 (nothing pinned) on a machine with one CPU.

    A client that measures its own CPU time per statement is charged for how its wake-ups meet the
    server's: sharing a CPU with the backend, or not, moved the measure by 20 µs from one run to the
    next. With the servers on one CPU and the client on another, the difference between two
    connections repeats within a microsecond or two.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield -1
        return
    cpu = cpus[-1]
    saved: dict[int, set[int]] = {}
    try:
        for root in roots:
            for pid in _family(root):
                with suppress(OSError):  # (gone meanwhile)
                    saved[pid] = os.sched_getaffinity(pid)
                    os.sched_setaffinity(pid, {cpu})
        yield cpus[0]
    finally:
        # Children forked meanwhile (a backend PgBouncer opened during the block) inherited the pin:
        # they get their parent's CPUs back too, or they would stay on one CPU for later runs.
        for root in roots:
            for pid in _family(root):
                restore = saved.get(pid) or saved.get(root)
                if restore:
                    with suppress(OSError):
                        os.sched_setaffinity(pid, restore)


def pin_self(cpu: int) -> None:
    """Run this process on ``cpu`` (what :func:`servers_pinned` yields); -1: leave it as it is."""
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
