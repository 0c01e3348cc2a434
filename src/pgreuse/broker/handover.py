"""Handing a running broker over to another parent: the Gunicorn ``USR2`` upgrade.

On USR2 the Gunicorn master forks and execs a new master, which runs the hooks' ``on_starting`` again
while the old master and its workers still serve. Starting a second broker there fails (the sockets
answer: "another broker is already listening") and, if it did not, would double the backends
PostgreSQL sees. So the new master adopts the running broker: it checks that the broker is its old
master's (the settings file the hooks wrote names that master as ``parent-pid``), writes the file
again with itself as the parent and sends the supervisor SIGHUP. The supervisor and the broker re-read
it, and from then on exit with the new master (the broker's pidfd watch moves to it). The old master,
when it exits, sees in the file that the broker is no longer its own and leaves it running.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable

import psycopg

from ..shm import Table, TableError, table_path
from .config import BrokerConfig, ConfigError
from .settings_file import read_settings

ADOPT_TIMEOUT = 10.0  # seconds for the broker to take its new parent


def owner(path: str) -> int:
    """The ``parent-pid`` in the hooks' settings file at ``path``: the master the broker exits with
    (0: no file, or none named)."""
    try:
        return int(read_settings(path).get("parent_pid", 0))
    except ConfigError:
        return 0


def adopt(config: BrokerConfig, old_master: int, path: str, write: Callable[[BrokerConfig], object]) -> int:
    """Make the broker serving ``config``'s sockets exit with ``config.parent_pid`` (this process)
    instead of ``old_master``; return its supervisor's pid. ``write`` writes the settings file
    ``path``.

    Raises:
        RuntimeError: the broker serving there is not ``old_master``'s, or did not take its new
            parent within :data:`ADOPT_TIMEOUT` seconds.
    """
    had = owner(path)
    if had != old_master:
        raise RuntimeError(
            f"a pgreuse broker already serves {config.control_socket}, and it is not the one of "
            f"this Gunicorn's old master (pid {old_master}; {path} names pid {had or 'none'}): stop "
            "that broker, or give this Gunicorn another socket_dir or port"
        )
    broker = _broker_pid(config)
    supervisor = _parent_of(broker)
    write(config)  # (parent_pid: this process)
    os.kill(supervisor, signal.SIGHUP)
    deadline = time.monotonic() + ADOPT_TIMEOUT
    while (parent := _parent_of_broker(config)) != config.parent_pid:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the pgreuse broker (pid {broker}) did not take pid {config.parent_pid} as its "
                f"parent within {ADOPT_TIMEOUT:g}s (it still names {parent}); see its log"
            )
        time.sleep(0.05)
    return supervisor


def stop(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM an adopted supervisor and wait until it is gone (it is not our child: a pidfd, not
    waitpid, says when it exits)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not select.select([fd], [], [], timeout)[0]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def _broker_pid(config: BrokerConfig) -> int:
    try:
        table = Table.open(table_path(config.socket_dir, config.port))
    except (OSError, TableError) as exc:
        raise RuntimeError(f"a broker answers on {config.control_socket} but its table: {exc}") from exc
    try:
        return table.broker_pid
    finally:
        table.close()


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _parent_of_broker(config: BrokerConfig) -> int:
    """The parent pid the broker watches now, as its admin console's SHOW CONFIG says."""
    try:
        with psycopg.connect(
            f"host={config.socket_dir} port={config.port} dbname=pgreuse",
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,  # the console speaks the simple protocol only
        ) as conn:
            for key, value, *_ in conn.execute("SHOW CONFIG").fetchall():
                if key == "parent-pid":
                    return int(value)
    except psycopg.Error:
        pass
    return 0
