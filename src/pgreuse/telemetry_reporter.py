"""A pool's registration (:func:`for_pool`) and this process's read-only view of its table
(:class:`_TableReader`), which decides whether this process is the pool's reporter.

Apart from the registry (:mod:`.telemetry_pools`) because it uses the providers (the create-time
histogram, the instruments made on first use), whose callbacks read the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

from .shm import Table, TableError, table_path
from .snapshot import Snapshot
from .telemetry_hooks import _get, _lock
from .telemetry_names import DB_NAMESPACE, DB_SYSTEM_NAME, POOL_NAME
from .telemetry_pools import PoolTelemetry, _pools

# -- pools and the reporter election ---------------------------------------------------------------


def for_control_socket(path: str, database: str) -> PoolTelemetry:
    """:func:`for_pool` from the control socket's path (``<socket dir>/.s.PGREUSE.<port>``)."""
    socket_dir, _, name = path.rpartition("/")
    return for_pool(socket_dir, int(name.rpartition(".")[2]), database)


def for_pool(socket_dir: str, port: int, database: str) -> PoolTelemetry:
    """The telemetry of the pool behind ``socket_dir``/``port`` (registered on first use)."""
    key = (socket_dir, port, database)
    pool = _pools.get(key)
    if pool is None:
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                name = f"{socket_dir}:{port}/{database}"
                path = table_path(socket_dir, port)
                attributes = {POOL_NAME: name}
                pool = PoolTelemetry(
                    name=name,
                    database=database,
                    table_path=path,
                    attributes=attributes,
                    span_attributes={POOL_NAME: name, DB_SYSTEM_NAME: "postgresql", DB_NAMESPACE: database},
                    reader=_TableReader(path, attributes),
                )
                _pools[key] = pool
            # The first process to connect reports from now on (its create_time baseline is now).
            pool.reader.elect()
        _get()  # the instruments, and their callbacks, exist once a pool does
    return pool


class _TableReader:
    """This process's read-only view of one table, and whether it is the pool's reporter."""

    def __init__(self, path: str, attributes: dict[str, str]) -> None:
        self.path = path
        self.attributes = attributes
        self.table: Table | None = None
        self.lock_fd = -1
        self.reporter = False
        self.seen_opened = 0  # backends_opened / connect_ns when create_time was last sampled
        self.seen_connect_ns = 0
        self.mutex = threading.Lock()

    def _drop(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock (no other fd of this process shares it)
            self.lock_fd = -1
        self.reporter = False

    def forget_after_fork(self) -> None:
        # The child shares the parent's open file description, hence its flock: it must not report
        # too. Closing its copy of the fd leaves the parent's lock in place.
        with contextlib.suppress(OSError):
            if self.lock_fd >= 0:
                os.close(self.lock_fd)
        self.lock_fd = -1
        self.reporter = False
        self.mutex = threading.Lock()

    def elect(self) -> bool:
        """Map the table if needed and try to become the reporter; True if this process reports."""
        with self.mutex:
            return self._elect()

    def _elect(self) -> bool:
        if self.table is not None:
            try:
                same = os.stat(self.path).st_ino == self.table.inode
            except OSError:
                same = False
            if not same:
                self._drop()  # the broker restarted (new table) or stopped: its lock is void too
        if self.table is None:
            try:
                self.table = Table.open(self.path)
            except (OSError, TableError):
                return False  # no broker now: report nothing rather than stale numbers
        if self.reporter:
            return True
        try:
            if self.lock_fd < 0:
                self.lock_fd = os.open(self.path, os.O_RDONLY)  # non-inheritable: not passed on exec
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another process reports this pool
        self.reporter = True
        snap = self.table.snapshot()
        self.seen_opened = snap.counters["backends_opened"]
        self.seen_connect_ns = snap.counters["connect_ns"]
        return True

    def read(self) -> Snapshot | None:
        """The table now if this process is the pool's reporter, else ``None``."""
        with self.mutex:
            if not self._elect():
                return None
            assert self.table is not None
            snap = self.table.snapshot()
            self._sample_create_time(snap)
            return snap

    def _sample_create_time(self, snap: Snapshot) -> None:
        # The table keeps only the total connect time and the number of backends opened; each new
        # backend since the last sample is recorded at the mean of the new connect time.
        opened, connect_ns = snap.counters["backends_opened"], snap.counters["connect_ns"]
        n = opened - self.seen_opened
        if n > 0 and connect_ns >= self.seen_connect_ns:
            mean = (connect_ns - self.seen_connect_ns) / n / 1e9
            hist = _get().create_time
            for _ in range(n):
                hist.record(mean, self.attributes)
        self.seen_opened, self.seen_connect_ns = opened, connect_ns
