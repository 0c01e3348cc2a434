"""The broker's lifecycle: start, serve until stopped, and shut down with nothing left behind.

:meth:`Lifecycle.run` makes the socket directory safe, binds the listeners (finding out first whether
another broker serves this directory and port), creates the shared-memory table, starts the pool and
the tasks that accept connections, and on SIGTERM/SIGINT (or ``--parent-pid`` exiting) closes the
listeners, lets leases end within ``--shutdown-timeout`` and removes the socket files and the table.
SIGHUP re-reads the settings (:mod:`.reload`). A task that fails is logged, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from .. import slots
from ..shm import Table, table_path
from ..wire import scan
from . import proxy
from . import reload as reloading
from .access import Access
from .broker_fields import BrokerFields
from .config import ConfigError, parse_listen_addr
from .hangups import HangupWatch
from .password_login import PasswordLogin
from .pool import Pool
from .socket_files import remove_if_stale

if TYPE_CHECKING:
    from .server import Broker

logger = logging.getLogger("pgreuse.broker")

# Connections a listener accepts per wake-up; more wait for the next loop turn, after other events.
_ACCEPT_BATCH = 64


class Lifecycle(BrokerFields):
    """Mixin of :class:`pgreuse.broker.server.Broker`."""

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._prepare_dir()
        # Listeners first: they find out whether another broker already serves this directory
        # and port, before anything of that broker's (its shared-memory table) is replaced.
        try:
            pg = self._listen(cfg.pg_socket, socket.SOCK_STREAM)
            ctl = self._listen(cfg.control_socket, socket.SOCK_SEQPACKET)
            tcp = self._listen_tcp(cfg.listen_addr) if cfg.listen_addr else None
            self.table = Table.create(
                table_path(cfg.socket_dir, cfg.port),
                max_size=cfg.max_size,
                min_size=cfg.min_size,
                wait_timeout=cfg.wait_timeout,
                database=self.target.database,
                user=self.target.user,
                claims=slots.ATOMIC,
            )
            self.table.set_limits(cfg.max_size, cfg.min_size, cfg.wait_timeout, cfg.max_waiting)
        except BaseException as exc:
            self._close_listeners()
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"--socket-dir {cfg.socket_dir!r}: {exc.strerror or exc} "
                    f"({getattr(exc, 'filename', '') or ''}); use a directory this user can write"
                ) from exc
            raise
        self.pool = Pool(cfg, self.target, self.table, loop)
        self.hangups = HangupWatch(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_signalled)
        self.watch_parent()
        self.pool.start()
        self._spawn(self._accept(pg, self._serve_pg))
        if tcp is not None:
            self._spawn(self._accept(tcp, self._serve_pg_tcp))
        self._spawn(self._accept(ctl, self._serve_control))
        self._spawn(self._janitor())
        logger.info(
            "pgreuse broker pid %d ready: clients connect with host=%s port=%d; backends: %s, "
            "max-size %d; proxy scanner: %s, session core: %s, event loop: %s",
            os.getpid(), cfg.socket_dir, cfg.port, self.target.describe(), cfg.max_size,
            scan.IMPLEMENTATION, proxy.CORE, _loop_name(loop),
        )  # fmt: skip
        try:
            await self._stop.wait()
        finally:
            logger.info("shutting down")
            self._close_listeners()
            # Proxied clients between transactions are told and closed now; those inside one keep
            # their backend for --shutdown-timeout, like handoff leases.
            for session in list(self.sessions.values()):
                if session.proxied:
                    session.shutdown()
            await self.pool.shutdown(cfg.shutdown_timeout)
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.hangups.close()
            self._unwatch_parent()
            with contextlib.suppress(OSError):
                os.unlink(self.table.path)
            self.table.close()

    def _close_listeners(self) -> None:
        # Nothing here may raise before every socket file is gone: a broker that leaves one behind
        # looks alive to the next one and to clients.
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for s in self._listeners:
            if loop is not None:
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    loop.remove_reader(s.fileno())  # (registered by _accept) never left on a closed fd
            if s.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(s.getsockname())
            s.close()
        self._listeners.clear()

    def _prepare_dir(self) -> None:
        d = self.config.socket_dir
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--socket-dir {d!r}: cannot create it: {exc}") from exc
        if not os.path.isdir(d):
            raise ConfigError(f"--socket-dir {d!r} exists and is not a directory")
        st = os.stat(d)
        # Whoever can write the directory can put their own socket in the broker's place and
        # impersonate it to every worker: it must be ours, and writable by no one else.
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ConfigError(
                f"--socket-dir {d!r} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}: "
                f"it must belong to the broker's user (uid {os.geteuid()}) and be writable by it "
                f"alone; use a directory of its own (e.g. /run/pgreuse, created with mode 0700)"
            )
        self._secure_dir(st)

    def _secure_dir(self, st: os.stat_result) -> None:
        """Give the socket directory the mode the allow lists call for (``st``: its stat)."""
        d = self.config.socket_dir
        try:
            changed = self.access.secure_dir(d, st)
        except OSError as exc:
            raise ConfigError(
                f"--socket-dir {d!r}: cannot set its mode to {self.access.dir_mode(st.st_gid):o}: "
                f"{exc.strerror or exc}; use a directory of its own"
            ) from exc
        if changed is not None:
            logger.info("--socket-dir %s: mode %o -> %o (%s)", d, *changed,
                        "other users are allowed in" if self.access.others_allowed
                        else "no other user is allowed in")  # fmt: skip

    def _listen(self, path: str, kind: int) -> socket.socket:
        if not remove_if_stale(path, kind):
            raise ConfigError(f"another broker is already listening on {path}; stop it or use another --port")
        s = socket.socket(socket.AF_UNIX, kind)
        s.bind(path)
        os.chmod(path, self.access.socket_mode)  # broker/access.py says why
        s.listen(512)
        s.setblocking(False)
        self._listeners.append(s)
        return s

    def _listen_tcp(self, addr: str) -> socket.socket:
        host, port = parse_listen_addr(addr)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            s.close()
            raise ConfigError(
                f"--listen-addr {addr!r}: cannot bind: {exc.strerror or exc}; pick a free port"
            ) from exc
        s.listen(512)
        s.setblocking(False)
        self._listeners.append(s)
        return s

    def reload(self) -> list[str]:
        """SIGHUP (and the admin console's RELOAD): re-read the settings, apply what can change
        live. A bad file is logged and changes nothing: a reload never stops the broker."""
        try:
            return reloading.reload(cast("Broker", self))  # (this mixin is always part of one)
        except ConfigError as exc:
            logger.error("reload failed, the settings in use stay: %s", exc)
            raise

    def apply_login_rules(self, access: Access, passwords: PasswordLogin | None) -> None:
        """A reload's allow lists and auth file: for connections from now on (those connected stay).
        The socket directory's and the sockets' modes follow the allow lists (broker/access.py)."""
        self.access, self.passwords = access, passwords
        try:
            self._secure_dir(os.stat(self.config.socket_dir))
            for s in self._listeners:
                if s.family == socket.AF_UNIX:
                    os.chmod(s.getsockname(), access.socket_mode)
        except (ConfigError, OSError) as exc:
            # The credential check already follows the new lists; only the modes lag (a directory
            # that stays closed keeps a newly allowed user out, not a refused one in).
            logger.error("reload: the modes of the socket directory and sockets stay: %s", exc)

    def _reload_signalled(self) -> None:
        with contextlib.suppress(ConfigError):  # (logged)
            self.reload()

    def watch_parent(self) -> None:
        """Exit when ``--parent-pid`` exits (a pidfd: even if it is SIGKILLed). Called again when a
        reload names another parent (the new master of a Gunicorn USR2 upgrade)."""
        pid = self.config.parent_pid
        if self._parent is not None and self._parent[0] == pid:
            return
        self._unwatch_parent()
        if not pid:
            return
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            logger.error("parent pid %d is gone; exiting", pid)
            self.stop()
            return

        def parent_exited() -> None:
            logger.warning("parent pid %d exited; shutting down", pid)
            self.stop()

        loop.add_reader(fd, parent_exited)
        self._parent = (pid, fd)
        logger.info("exiting with parent pid %d", pid)

    def _unwatch_parent(self) -> None:
        if self._parent is not None:
            fd = self._parent[1]
            self._parent = None
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Nobody awaits these tasks: an exception that escapes one is logged here, not lost.
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("broker task %s failed", task.get_coro(), exc_info=exc)

    async def _accept(
        self, lsock: socket.socket, handler: Callable[[socket.socket], Coroutine[Any, Any, None]]
    ) -> None:
        """Serve ``lsock`` until the broker stops (this task is cancelled).

        One reader for the listener's life, and every pending connection (up to _ACCEPT_BATCH)
        accepted per wake-up: ``sock_accept()`` registered and removed a reader, and cost a loop
        turn and a future, for each connection. _close_listeners() removes the reader.
        """
        loop = asyncio.get_running_loop()
        fd = lsock.fileno()
        # socket.accept() converts the listener's family and type to enums for every connection
        # (a sixth of the broker's Python time per connect): they are read once, as ints.
        family, kind, proto = int(lsock.family), int(lsock.type), lsock.proto

        def resume() -> None:
            if lsock.fileno() >= 0:  # not closed meanwhile (shutting down)
                loop.add_reader(fd, ready)

        def ready() -> None:
            for _ in range(_ACCEPT_BATCH):  # the reader is level-triggered: the rest come next turn
                try:
                    # _socket.socket._accept(): socket.accept() calls it and wraps the fd; typeshed
                    # does not list it.
                    conn_fd, _ = lsock._accept()  # type: ignore[attr-defined]
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    # One failed accept (a client that hung up first, the open-files limit) must
                    # not stop the listener: log it, pause, and go on.
                    hint = "; raise the open-files limit" if exc.errno in (errno.EMFILE, errno.ENFILE) else ""
                    logger.error("accept on %s failed: %s%s", lsock.getsockname(), exc, hint)
                    loop.remove_reader(fd)
                    loop.call_later(0.1, resume)
                    return
                conn = socket.socket(family, kind, proto, fileno=conn_fd)
                conn.setblocking(False)
                self._spawn(handler(conn))

        loop.add_reader(fd, ready)
        try:
            await loop.create_future()  # never set: the reader does the work
        finally:
            if lsock.fileno() >= 0:
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    loop.remove_reader(fd)

    async def _janitor(self) -> None:
        assert self.pool is not None
        while True:
            await asyncio.sleep(0.25)
            self.pool.tick()


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
