"""The broker process: its two listeners, the clients on them, and its lifecycle.

* ``<socket-dir>/.s.PGSQL.<port>`` speaks the PostgreSQL protocol. A pgreuse connection's libpq does its
  startup here and then *parks*: the broker answers with the parameters of a real backend and a parking
  key, and the socket stays quiet until the connection closes. Any other client (psql, pgbench) sends
  queries on it instead, and the broker proxies them to leased backends (:mod:`.proxy`). The
  database ``pgreuse`` is the admin console (:mod:`.admin`). CancelRequests arrive here too and are
  forwarded to the backend currently leased by the connection that owns the key. The same protocol is
  served on ``--listen-addr`` (TCP) when it is set: loopback only, or any address with ``--auth-file``,
  whose users log in with SCRAM-SHA-256 (:mod:`.password_login`).
* ``<socket-dir>/.s.PGREUSE.<port>`` (``SOCK_SEQPACKET``) carries lease messages, one channel per worker
  process, and the backend fds (``SCM_RIGHTS``).

Malformed input closes that client with a log line; it never takes the broker or a backend down.
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
from typing import Any

from .. import slots
from ..shm import Table, table_path
from ..wire import control, frames, scan
from . import admin, proxy
from . import reload as reloading
from .access import Access, Peer, parse_gids, parse_uids
from .config import BrokerConfig, ConfigError, parse_listen_addr
from .connector import BackendConnectError, BackendTarget, parse_target
from .control_client import ControlClient, OutboxFull, outbox_limit
from .greeting import Greeting, ParkingSecrets
from .hangups import HangupWatch
from .login import (
    OVER_LIMIT_GRACE,
    Admission,
    LoginTimeout,
    StartupRefused,
    login_timeout_error,
    os_user_of,
    own_user,
    read_startup,
    startup_failure,
)
from .password_login import ClientLeft, PasswordLogin
from .pool import Pool
from .proxy import ProxySession, ProxyStats, PyProxySession
from .settings_file import SettingsSource
from .socket_files import remove_if_stale
from .upkeep import CHECKED_PARAMETERS

logger = logging.getLogger("pgreuse.broker")

# Startup parameters a client may send that do not change how values are encoded (accepted, shown in
# the stats) — everything else must match the pool or is refused.
HARMLESS_PARAMETERS = frozenset({"application_name", "fallback_application_name"})
# Startup parameters that change encoding/parsing: must equal the pool's (DESIGN.md §3 rule 7).
MATCHED_PARAMETERS = ("client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
                      "standard_conforming_strings")  # fmt: skip
# Connections a listener accepts per wake-up; more wait for the next loop turn, after other events.
_ACCEPT_BATCH = 64
PARKING_KEY_BASE = 1 << 30  # above any real pid (pid_max <= 2**22): a parking key is never a pid


class Parking:
    """A parked libpq connection: what its CancelRequests may name."""

    def __init__(self, key: int, secret: int, peer_pid: int, application_name: str) -> None:
        self.key = key
        self.secret = secret
        self.peer_pid = peer_pid
        self.application_name = application_name


class Broker:
    def __init__(self, config: BrokerConfig, source: SettingsSource | None = None) -> None:
        self.config = config
        self.source = source  # where a reload reads the settings again (None: nowhere)
        self._parent: tuple[int, int] | None = None  # (pid, pidfd) watched: we exit with it
        try:
            self.target: BackendTarget = parse_target(config.dsn)
        except ValueError as exc:
            raise ConfigError(f"--dsn: {exc}") from exc
        self.access = Access(parse_uids(config.allow_uid), parse_gids(config.allow_gid))
        self.passwords: PasswordLogin | None = None
        if config.auth_file:
            try:
                self.passwords = PasswordLogin.from_file(config.auth_file)
            except ValueError as exc:
                raise ConfigError(f"--auth-file: {exc}") from exc
        # Looked up once (a lookup per startup may fail at the open-files limit).
        self.os_user = own_user()
        self.admission = Admission(config.max_client_conn)
        self.parkings: dict[int, Parking] = {}
        self._next_key = PARKING_KEY_BASE
        self.greeting = Greeting()
        self.parking_secrets = ParkingSecrets()
        self._stop = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.table: Table | None = None
        self.pool: Pool | None = None
        self.hangups: HangupWatch | None = None
        self.sessions: dict[int, PyProxySession] = {}  # parking key -> session (parked or proxied)
        self.admin_sessions = 0
        self.proxy_stats = ProxyStats()
        self._holders: set[int] = set()  # holder ids of the open control channels
        self._next_holder = slots.FIRST_WORKER

    # -- lifecycle --------------------------------------------------------------------------------

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
            self.table.set_wait_limits(cfg.wait_timeout, cfg.max_waiting)
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
            return reloading.reload(self)
        except ConfigError as exc:
            logger.error("reload failed, the settings in use stay: %s", exc)
            raise

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

    def _allowed(self, sock: socket.socket, what: str) -> tuple[Peer | None, str]:
        """The peer, or None and what to tell it."""
        peer, uid = self.access.check(sock)
        if peer is None:
            why = self.access.refusal(uid)
            logger.warning("%s from uid %d refused: %s", what, uid, why)
            return None, why
        return peer, ""

    # -- the PostgreSQL-protocol listener ---------------------------------------------------------

    async def _serve_pg_tcp(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self._serve_pg(sock, tcp=True)

    async def _serve_pg(self, sock: socket.socket, tcp: bool = False) -> None:
        loop = asyncio.get_running_loop()
        parking: Parking | None = None
        session: PyProxySession | None = None
        is_admin = False
        peer_pid: int | None = None
        trusted = False  # the broker's own user or root, on the Unix socket
        starting = self.admission.admit(len(self.parkings) + self.admin_sessions)
        admitted = starting

        def started() -> None:
            nonlocal starting
            if starting:
                starting = False
                self.admission.started()

        try:
            if tcp:
                # Loopback only (config refuses other addresses); no peer credentials on TCP.
                peer_pid = 0
                host, port = sock.getpeername()[:2]
                addr = f"{host}:{port}"
            else:
                peer, why = self._allowed(sock, "connection")
                if peer is None:
                    await loop.sock_sendall(sock, frames.error_response("28000", why, severity="FATAL"))
                    return
                peer_pid, trusted = peer.pid, peer.trusted
                addr = "unix"
            timeout = self.config.client_login_timeout
            login_deadline = loop.time() + timeout
            if not admitted:
                timeout = min(timeout or OVER_LIMIT_GRACE, OVER_LIMIT_GRACE)
            try:
                first = await read_startup(sock, timeout, self._cancel)
            except LoginTimeout as exc:
                if admitted:
                    logger.info("connection from pid %s closed: %s", peer_pid, exc)
                # Best effort, never waiting: the peer may not be reading.
                with contextlib.suppress(OSError):
                    sock.send(login_timeout_error(timeout) if admitted else self._client_limit_error())
                return
            if first is None:
                return
            packet, pending = first
            if not admitted:  # a second chance: someone may have left since the accept
                starting = admitted = self.admission.admit(len(self.parkings) + self.admin_sessions)
            try:
                if not admitted:
                    raise self._client_limit_refusal()
                if packet.params.get("database") == admin.ADMIN_DATABASE:
                    if tcp:
                        # TCP peers cannot be identified (no SO_PEERCRED): PAUSE and SHUTDOWN
                        # stay with the users the Unix socket lets in.
                        raise StartupRefused(
                            "28000",
                            "the pgreuse admin console is not served over TCP",
                            hint=f"connect over the Unix socket: psql -h {self.config.socket_dir} "
                            f"-p {self.config.port} {admin.ADMIN_DATABASE}",
                        )
                    if not trusted:
                        raise StartupRefused(
                            "28000",
                            "the pgreuse admin console is for the broker's own user and root only",
                            hint="--allow-uid and --allow-gid let other users in as clients, not "
                            "as administrators",
                        )
                    is_admin = True
                    self.admin_sessions += 1
                    started()
                    await loop.sock_sendall(sock, admin.startup_reply(
                        self, packet.params.get("application_name", "")))  # fmt: skip
                    await admin.serve(self, sock, pending)
                    return
                authenticated = False
                if tcp and self.passwords is not None:
                    # --client-login-timeout covers the startup and the password exchange together.
                    left = max(login_deadline - loop.time(), 0.001) if self.config.client_login_timeout else 0
                    user = packet.params.get("user", "")
                    pending = await self.passwords.check(sock, user, pending, left)
                    authenticated = True
                reply, parking = await self._startup(packet, peer_pid, authenticated)
                started()
            except ClientLeft as exc:
                logger.info("client %s: %s (user %r)", addr, exc, packet.params.get("user", ""))
                return
            except StartupRefused as exc:
                who = addr if tcp else f"pid {peer_pid}"
                user = packet.params.get("user", "")
                why = f" ({exc.why})" if exc.why else ""
                logger.info("startup from %s (user %r) refused: %s%s", who, user, exc.message, why)
                await loop.sock_sendall(sock, frames.error_response(
                    exc.sqlstate, exc.message, severity="FATAL", hint=exc.hint))  # fmt: skip
                return
            await loop.sock_sendall(sock, reply)
            assert self.pool is not None
            params = packet.params
            session = ProxySession(
                sock,
                self.pool,
                parking_key=parking.key,
                peer_pid=peer_pid,
                session_mode=self.config.pool_mode == "session",
                stats=self.proxy_stats,
                user=params.get("user", ""),
                database=params.get("database", params.get("user", "")),
                application_name=parking.application_name,
                addr=addr,
            )
            self.sessions[parking.key] = session
            assert self.hangups is not None
            self.hangups.watch(sock, session.connection_error)
            session.start(pending)
            await session.done
        except (frames.ProtocolError, ConnectionError) as exc:
            logger.info("client connection dropped: %s", exc)
            if self.table is not None:
                self.table.add("protocol_errors")
        except Exception as exc:
            # A bug, or a resource the startup could not get (the open-files limit): this client is
            # told why, and the broker serves the others.
            logger.error("client connection from pid %s failed: %s", peer_pid, exc, exc_info=True)
            if session is None and not is_admin:
                with contextlib.suppress(OSError):
                    sock.send(startup_failure(exc))
        finally:
            started()
            if session is not None:
                session.close()  # before sock.close(): it unregisters the fd from the loop
                assert self.hangups is not None
                self.hangups.unwatch(sock)
            if is_admin:
                self.admin_sessions -= 1
            if parking is not None:
                self.parkings.pop(parking.key, None)
                self.sessions.pop(parking.key, None)
                assert self.table is not None
                self.table.set("parked", len(self.parkings))
            sock.close()

    def _client_limit_refusal(self) -> StartupRefused:
        limit = self.config.max_client_conn
        starting = self.admission.starting
        clients = len(self.parkings) + self.admin_sessions + starting
        return StartupRefused(
            "53300",
            f"no more connections allowed (max_client_conn): {clients} clients are connected "
            f"({starting} of them still starting up) and --max-client-conn is {limit}",
            hint="close idle connections, or restart the broker with a higher --max-client-conn",
        )

    def _client_limit_error(self) -> bytes:
        refusal = self._client_limit_refusal()
        return frames.error_response(refusal.sqlstate, refusal.message, severity="FATAL", hint=refusal.hint)

    async def _startup(
        self, packet: frames.StartupMessage, peer_pid: int, authenticated: bool = False
    ) -> tuple[bytes, Parking]:
        """``authenticated``: the client logged in with a password of --auth-file, as any user in it."""
        assert self.pool is not None
        if packet.version_major != 3:
            raise StartupRefused("0A000", f"unsupported protocol version {packet.version_major}")
        params = packet.params
        pool_user, pool_db = self.target.user, self.target.database
        user = params.get("user", "")
        # libpq's default user is the client's OS user name: accepted too (the pool's user is used).
        if not authenticated and user not in (pool_user, self.os_user) and user != os_user_of(peer_pid):
            raise StartupRefused(
                "28000",
                f'user "{user}" does not match this broker\'s pool (user "{pool_user}")',
                hint=f"connect with user={pool_user}, or leave user out",
            )
        database = params.get("database", user)
        if database != pool_db:
            raise StartupRefused(
                "3D000",
                f'database "{database}" is not served by this broker (its pool is database "{pool_db}")',
                hint=f"connect with dbname={pool_db}",
            )
        if params.get("replication"):
            raise StartupRefused("0A000", "replication connections cannot go through pgreuse")
        try:
            pool_params = await self.pool.wait_parameters(self.config.wait_timeout)
        except BackendConnectError as exc:
            raise StartupRefused("08006", f"pgreuse broker cannot reach PostgreSQL: {exc}") from exc
        for name, value in params.items():
            if name in ("user", "database") or name in HARMLESS_PARAMETERS:
                continue
            if name == "options":
                if value.strip():
                    raise StartupRefused(
                        "0A000",
                        f"startup options {value!r} cannot be honoured: backends are shared "
                        "and were opened with the pool's settings",
                        hint="remove options= (or PGOPTIONS) from the client, or set them on "
                        "the broker's --dsn",
                    )
                continue
            if name == "extra_float_digits" and _shortest_floats(value, pool_params):
                continue  # JDBC sends 3; from PostgreSQL 12 every value > 0 means the same output
            if name.startswith("_pq_."):
                continue  # protocol options: answered with NegotiateProtocolVersion below
            matched = next((m for m in MATCHED_PARAMETERS if m.lower() == name.lower()), None)
            if matched is not None:
                have = pool_params.get(matched, "")
                if _norm(value) != _norm(have):
                    raise StartupRefused(
                        "0A000",
                        f"{matched}={value!r} differs from the pool's {matched}={have!r}; "
                        "backends are shared, so every client must use the pool's value",
                        hint=f"remove {matched} from the client's settings, or set it on the "
                        "broker's --dsn (options='-c ...')",
                    )
                continue
            raise StartupRefused(
                "0A000",
                f"startup parameter {name}={value!r} cannot be honoured: backends are shared",
                hint="set it with SET inside each transaction, or on the broker's --dsn",
            )
        self._next_key += 1
        parking = Parking(
            self._next_key,
            self.parking_secrets.next(),
            peer_pid,
            params.get("application_name", ""),
        )
        self.parkings[parking.key] = parking
        assert self.table is not None
        self.table.set("parked", len(self.parkings))
        negotiate = b""
        if packet.version_minor > 0:
            unrecognized = [k for k in params if k.startswith("_pq_.")]
            negotiate = frames.negotiate_protocol_version(0, unrecognized)
        reply = self.greeting.reply(
            pool_params, parking.application_name, parking.key, parking.secret, negotiate
        )
        return reply, parking

    def _cancel(self, key: int, secret: int) -> None:
        assert self.pool is not None
        parking = self.parkings.get(key)
        if parking is None or parking.secret != secret:
            logger.info("cancel request with an unknown key %d ignored", key)
            return
        self.pool.cancel(key)

    # -- the control listener ---------------------------------------------------------------------

    async def _serve_control(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        assert self.pool is not None and self.table is not None
        peer, refusal = self._allowed(sock, "control channel")
        if peer is None:
            # Any version decodes a Deny: the worker reports why instead of a bare EOF.
            # Its Hello is read first (briefly): closing before it comes would fail the worker's send
            # with EPIPE, and the Deny would go unread.
            with contextlib.suppress(OSError, TimeoutError):
                sock.send(control.encode(control.Deny(0, control.DenyCode.BAD_REQUEST, refusal)))
                async with asyncio.timeout(1.0):
                    await loop.sock_recv(sock, control.MAX_MESSAGE + 1)
            sock.close()
            return
        peer_pid = peer.pid
        ended: asyncio.Future[BaseException | None] = loop.create_future()

        def overflowed(why: OutboxFull) -> None:
            if not ended.done():
                ended.set_result(why)

        client = ControlClient(sock, peer_pid, loop, self._new_holder(),
                               limit=outbox_limit(len(self.pool.slots)), on_overflow=overflowed)  # fmt: skip
        client.trusted = peer.trusted
        self.table.add("clients")

        def readable() -> None:
            # One registration for the channel's life, and every queued packet read per wake-up:
            # this is the lease hot path, and sock_recv() would add and remove the reader per message.
            try:
                while not ended.done():  # (an overflow ends it while it reads)
                    try:
                        packet = sock.recv(control.MAX_MESSAGE + 1)
                    except BlockingIOError:
                        return
                    if not packet:
                        raise ConnectionResetError("end of file")
                    self._handle_control(client, control.decode(packet))
            except Exception as exc:
                if not ended.done():
                    ended.set_result(exc)

        loop.add_reader(sock.fileno(), readable)
        try:
            why = await ended
            if isinstance(why, OutboxFull):
                self.table.add("protocol_errors")  # (logged when it overflowed)
            elif isinstance(why, control.ControlError):
                logger.warning("control channel of pid %d dropped: %s", peer_pid, why)
                self.table.add("protocol_errors")
            elif why is not None and not isinstance(why, OSError):
                logger.error("control channel of pid %d dropped by an internal error", peer_pid,
                             exc_info=why)  # fmt: skip
        finally:
            client.drop()
            self.table.add("clients", -1)
            self.pool.client_gone(client)
            self._holders.discard(client.holder)
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
                loop.remove_writer(sock.fileno())
            sock.close()

    def _new_holder(self) -> int:
        """A holder id no open control channel has (ids are 32-bit in the slot word)."""
        while True:
            holder = self._next_holder
            self._next_holder = holder + 1 if holder < 0xFFFFFFFF else slots.FIRST_WORKER
            if holder not in self._holders:
                self._holders.add(holder)
                return holder

    def _welcome(self, client: ControlClient) -> control.Welcome:
        assert self.pool is not None
        proxy_only = self.pool.proxy_only
        if proxy_only is None:
            # PostgreSQL unreachable so far: guess from the sslmode. A wrong guess only costs
            # speed: a worker told "proxy" never claims, and a TLS pool never shares a slot.
            proxy_only = self.target.tls_possible
        claims = self.pool.claims and not proxy_only and client.trusted
        # The table's slot count (workers map it by that size), not --max-size: a reload may
        # lower that below the slots the table was made with.
        return control.Welcome(control.VERSION, os.getpid(), len(self.pool.slots), proxy_only,
                               client.holder if claims else 0)  # fmt: skip

    def _greet(self, client: ControlClient) -> None:
        """The Welcome, then every open slot's fd (DESIGN.md §4)."""
        assert self.pool is not None
        welcome = self._welcome(client)
        client.send(welcome)
        if welcome.holder:
            self.pool.join(client)

    async def _welcome_when_known(self, client: ControlClient) -> None:
        """sslmode prefer/allow: whether backends use TLS is known once one is open."""
        assert self.pool is not None
        # Below the worker's Hello timeout (10 s), so it gets an answer rather than a timeout.
        with contextlib.suppress(BackendConnectError):
            await self.pool.wait_parameters(min(5.0, self.config.wait_timeout))
        self._greet(client)

    def _handle_control(self, client: ControlClient, msg: control.Message) -> None:
        assert self.pool is not None
        match msg:
            case control.Hello(version, _pid):
                if version != control.VERSION:
                    why = (
                        f"the worker speaks control protocol {version} and this broker (pid "
                        f"{os.getpid()}) speaks {control.VERSION}: run the same pgreuse version in "
                        "the broker and the application"
                    )
                    # Any version decodes a Deny: the worker reports why instead of a bare EOF.
                    client.send(control.Deny(0, control.DenyCode.BAD_REQUEST, why))
                    raise control.ControlError(why)
                if self.pool.proxy_only is not None:
                    self._greet(client)
                else:
                    self._spawn(self._welcome_when_known(client))
            case control.Poke():
                self.pool.poked()
            case control.Release(slot, generation, outcome):
                self.pool.worker_release(client, slot, generation, outcome)
            case control.Want(slot) if client.trusted:  # (others get no fds: broker/access.py)
                self.pool.want(client, slot)
            case control.Dirty(parking_key):
                parking = self.parkings.get(parking_key)
                session = self.sessions.get(parking_key)
                if parking is not None and parking.peer_pid == client.pid and session is not None:
                    session.mark_dirty()
            case _:
                raise control.ControlError(f"unexpected message from a worker: {msg!r}")


def _shortest_floats(value: str, pool_params: dict[str, str]) -> bool:
    """True if ``extra_float_digits=value`` gives the output every backend already gives.

    From PostgreSQL 12, any value above 0 selects the shortest exact float output, which is the
    default (1): a client asking for 2 or 3 (JDBC) sees no difference on a shared backend.
    """
    try:
        digits = int(value)
        major = int(pool_params.get("server_version", "0").split(".")[0].split(" ")[0])
    except ValueError:
        return False
    return digits > 0 and major >= 12


def _norm(value: str) -> str:
    return value.replace(" ", "").replace("-", "").replace("_", "").lower()


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


# Checked parameters are exported so tests can assert the replay covers them.
__all__ = ["CHECKED_PARAMETERS", "Broker", "ControlClient"]
