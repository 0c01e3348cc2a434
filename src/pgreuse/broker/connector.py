"""Open, cancel and query backend connections: the asyncio I/O driver around :mod:`pgreuse.wire`.

Contract: :func:`parse_target` turns a libpq-style conninfo (plus libpq's environment fallbacks)
into a :class:`BackendTarget`, refusing what the broker cannot do yet (several hosts, TLS).
:func:`open_backend` returns a non-blocking socket that finished startup and sits at ReadyForQuery
``I`` with nothing unread, or raises :class:`BackendConnectError` naming the target and the
server's error, with the socket closed. :func:`run_simple_query` drives one simple query on such a
socket; on :class:`BackendQueryError` the backend's protocol state is unknown and it must be closed.

This is the I/O boundary: ``OSError`` and timeouts become these errors here (``raise ... from``),
and cancellation always propagates after closing what was opened.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import socket
from collections.abc import Mapping

import attrs
import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgreuse.wire import frames
from pgreuse.wire.auth import AuthError
from pgreuse.wire.frames import ProtocolError
from pgreuse.wire.query import SimpleQuery
from pgreuse.wire.startup import BackendStartup, StartupFailed

logger = logging.getLogger("pgreuse.broker")

# libpq's compiled-in default on Debian/Ubuntu packages; other builds use /tmp.
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PORT = 5432
# libpq waits forever without connect_timeout; a broker must not hang a pool slot, so it caps it.
DEFAULT_CONNECT_TIMEOUT = 10.0
_RECV_SIZE = 65536
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class BackendConnectError(Exception):
    """A backend connection could not be opened; the message names the target and the cause."""


class BackendQueryError(Exception):
    """A query on a backend failed at the I/O or protocol level; close that backend."""


class TLSNotSupported(ValueError):
    """The conninfo asks for an encrypted backend connection, which handoff cannot use."""


@attrs.frozen
class BackendTarget:
    """Where and how to open backend connections (from :func:`parse_target`)."""

    host: str  # Unix socket directory, host name or address
    port: int
    is_unix: bool
    user: str
    database: str
    password: str | None = attrs.field(repr=False)
    options: str | None
    application_name: str | None
    connect_timeout: float
    sslmode: str
    client_encoding: str | None = None

    @property
    def socket_path(self) -> str:
        """The Unix socket file, named the way libpq and the postmaster name it."""
        return f"{self.host}/.s.PGSQL.{self.port}"

    def address(self) -> str:
        """``unix socket /dir/.s.PGSQL.5432`` or ``tcp host:port`` (IPv6 in brackets)."""
        if self.is_unix:
            return f"unix socket {self.socket_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp {host}:{self.port}"

    def describe(self) -> str:
        """Address, user and database, for error messages and logs (never the password)."""
        return f"{self.address()} (user {self.user}, database {self.database})"


@attrs.frozen
class OpenedBackend:
    """A backend after startup: non-blocking, connected, at ReadyForQuery ``I``, nothing unread."""

    sock: socket.socket
    parameters: dict[str, str]
    backend_pid: int
    backend_secret: int
    connect_seconds: float


def _tls_error(target_desc: str, why: str) -> TLSNotSupported:
    return TLSNotSupported(
        f"{target_desc}: {why}. Handoff needs a plaintext backend socket; TLS backends need the "
        "broker's proxy mode, which is not built yet. Set sslmode=disable on a trusted network or "
        "connect over a Unix socket (libpq's default on TCP is sslmode=prefer, so a TCP conninfo "
        "without sslmode gets this error too)."
    )


def _check_plaintext(target: BackendTarget, gssencmode: str = "prefer") -> None:
    if gssencmode == "require":
        raise _tls_error(target.address(), "gssencmode=require asks for GSSAPI encryption")
    if not target.is_unix and target.sslmode != "disable":
        raise _tls_error(target.address(), f"sslmode={target.sslmode} may use TLS")


def parse_target(conninfo: str, env: Mapping[str, str] = os.environ) -> BackendTarget:
    """Build a :class:`BackendTarget` from a conninfo string or URI, the way libpq would.

    Unset keys fall back to PGHOST, PGHOSTADDR, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE,
    PGGSSENCMODE, PGOPTIONS, PGCONNECT_TIMEOUT, PGAPPNAME, PGCLIENTENCODING, then to libpq's
    defaults (Unix socket in /var/run/postgresql, port 5432, the OS user, database = user).
    ``connect_timeout`` 0 or unset means 10 s rather than libpq's "forever".

    Raises:
        ValueError: unparsable conninfo, several hosts, bad port/timeout/sslmode.
        TLSNotSupported: the connection would or could be encrypted (TCP without sslmode=disable,
            gssencmode=require).
    """
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid backend conninfo: {exc}") from exc

    def get(key: str, envvar: str | None = None) -> str | None:
        value = given.get(key)
        text = None if value is None else str(value)
        if not text and envvar is not None:
            text = env.get(envvar)
        return text or None  # libpq treats an empty value as unset

    host = get("host", "PGHOST")
    hostaddr = get("hostaddr", "PGHOSTADDR")
    port_text = get("port", "PGPORT")
    for key, value in (("host", host), ("hostaddr", hostaddr), ("port", port_text)):
        if value is not None and "," in value:
            raise ValueError(
                f"{key}={value!r} lists several servers, which pgreuse does not support yet: "
                "give the broker one host (put a load balancer or an upstream pooler in front)"
            )
    try:
        port = int(port_text) if port_text is not None else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"invalid port {port_text!r}: expected an integer") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}: expected 1 to 65535")

    if hostaddr is not None:
        # libpq connects to hostaddr and uses host only for authentication and TLS names.
        host, is_unix = hostaddr, False
    else:
        host = host or DEFAULT_SOCKET_DIR
        is_unix = host.startswith("/")

    user = get("user", "PGUSER") or getpass.getuser()
    database = get("dbname", "PGDATABASE") or user

    timeout_text = get("connect_timeout", "PGCONNECT_TIMEOUT")
    try:
        timeout = float(timeout_text) if timeout_text is not None else 0.0
    except ValueError:
        raise ValueError(f"invalid connect_timeout {timeout_text!r}: expected seconds") from None
    if timeout <= 0:
        timeout = DEFAULT_CONNECT_TIMEOUT

    sslmode = get("sslmode", "PGSSLMODE")
    if sslmode is None:
        sslmode = "require" if get("requiressl", "PGREQUIRESSL") == "1" else "prefer"
    if sslmode not in _SSLMODES:
        raise ValueError(f"invalid sslmode {sslmode!r}: expected one of {', '.join(_SSLMODES)}")

    target = BackendTarget(
        host=host,
        port=port,
        is_unix=is_unix,
        user=user,
        database=database,
        password=get("password", "PGPASSWORD"),
        options=get("options", "PGOPTIONS"),
        application_name=get("application_name", "PGAPPNAME") or get("fallback_application_name"),
        connect_timeout=timeout,
        sslmode=sslmode,
        client_encoding=get("client_encoding", "PGCLIENTENCODING"),
    )
    _check_plaintext(target, get("gssencmode", "PGGSSENCMODE") or "prefer")
    return target


def startup_params(target: BackendTarget, extra_options: str | None = None) -> dict[str, str]:
    """StartupMessage parameters for ``target``; ``extra_options`` is appended to ``options``."""
    params = {"user": target.user, "database": target.database}
    options = " ".join(o for o in (target.options, extra_options) if o)
    if options:
        params["options"] = options
    if target.application_name:
        params["application_name"] = target.application_name
    if target.client_encoding:
        params["client_encoding"] = target.client_encoding
    return params


async def _connect(target: BackendTarget) -> socket.socket:
    """A connected non-blocking socket to ``target``; OSError if no address accepts."""
    loop = asyncio.get_running_loop()
    if target.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, target.socket_path)
        except BaseException:
            sock.close()
            raise
        return sock

    infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    # Like libpq, try every address the name resolves to before giving up.
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last if last is not None else OSError(f"no address found for {target.host!r}")


async def _recv(sock: socket.socket) -> bytes:
    data = await asyncio.get_running_loop().sock_recv(sock, _RECV_SIZE)
    if not data:
        raise ConnectionResetError("server closed the connection unexpectedly")
    return data


def _os_reason(exc: OSError) -> str:
    # asyncio's sock_connect puts "Connect call failed (addr)" in strerror; the errno text is the
    # useful part, and the caller's message already names the address.
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _is_deadline(exc: BaseException) -> bool:
    # asyncio.timeout() raises a bare TimeoutError; an OS-level ETIMEDOUT is also a TimeoutError
    # but carries an errno, and is reported as the OS error it is.
    return isinstance(exc, TimeoutError) and exc.errno is None


async def open_backend(target: BackendTarget, *, extra_options: str | None = None) -> OpenedBackend:
    """Connect to ``target`` and complete startup and authentication.

    ``extra_options`` is appended to the startup ``options`` (for example
    ``"-c idle_in_transaction_session_timeout=5000"``). The whole operation is bounded by
    ``target.connect_timeout``.

    Raises:
        BackendConnectError: any failure (refused, timeout, server error such as a wrong password,
            unsupported authentication, bad bytes); the socket is closed.
        TLSNotSupported: ``target`` asks for TLS on TCP (only if built by hand: parse_target
            already refuses it).
    """
    _check_plaintext(target)
    loop = asyncio.get_running_loop()
    started = loop.time()
    where = f"cannot open a backend on {target.describe()}"
    startup = BackendStartup(startup_params(target, extra_options), target.password)
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(target.connect_timeout):
            sock = await _connect(target)
            await loop.sock_sendall(sock, startup.initial_bytes())
            while not startup.done:
                reply = startup.feed(await _recv(sock))
                if reply:
                    await loop.sock_sendall(sock, reply)
        extra = startup.leftover()
        if extra:
            raise ProtocolError(f"server sent {len(extra)} unexpected bytes after ReadyForQuery")
        if startup.transaction_status != b"I":
            raise ProtocolError(f"server is not idle after startup (status {startup.transaction_status!r})")
        opened = OpenedBackend(
            sock=sock,
            parameters=dict(startup.parameters),
            backend_pid=startup.backend_pid,
            backend_secret=startup.backend_secret,
            connect_seconds=loop.time() - started,
        )
    except BaseException as exc:
        if sock is not None:
            sock.close()
        if isinstance(exc, StartupFailed):
            raise BackendConnectError(f"{where}: {exc}") from exc
        if isinstance(exc, AuthError | ProtocolError):
            raise BackendConnectError(f"{where}: {exc}") from exc
        if _is_deadline(exc):
            raise BackendConnectError(
                f"{where}: no answer within {target.connect_timeout:g} s (connect_timeout)"
            ) from exc
        if isinstance(exc, OSError):
            raise BackendConnectError(f"{where}: {_os_reason(exc)}") from exc
        raise
    logger.debug(
        "opened backend pid %d on %s in %.1f ms (auth %s)",
        opened.backend_pid,
        target.describe(),
        opened.connect_seconds * 1000,
        startup.auth_method,
    )
    return opened


async def send_cancel(target: BackendTarget, pid: int, secret: int) -> None:
    """Ask the server to cancel what backend ``pid`` is running (a new connection, then closed).

    Like libpq, wait until the server closes the connection: it has then processed the request.
    Success says nothing about whether a query was actually running.

    Raises:
        BackendConnectError: the cancel connection could not be made or timed out.
    """
    loop = asyncio.get_running_loop()
    where = f"cannot send a cancel request for pid {pid} to {target.describe()}"
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(target.connect_timeout):
            sock = await _connect(target)
            await loop.sock_sendall(sock, frames.cancel_request(pid, secret))
            while await loop.sock_recv(sock, _RECV_SIZE):
                pass
    except OSError as exc:
        if _is_deadline(exc):
            raise BackendConnectError(
                f"{where}: no answer within {target.connect_timeout:g} s (connect_timeout)"
            ) from exc
        raise BackendConnectError(f"{where}: {_os_reason(exc)}") from exc
    finally:
        if sock is not None:
            sock.close()


async def run_simple_query(sock: socket.socket, sql: str, timeout: float) -> SimpleQuery:
    """Run ``sql`` with the simple protocol on an idle backend socket and collect the answer.

    A server error is not raised: look at ``.error`` and ``.transaction_status``.

    Raises:
        BackendQueryError: I/O error, timeout, connection closed, malformed answer, or bytes after
            ReadyForQuery; the backend's state is unknown and it must be closed (not done here:
            the caller owns the socket).
    """
    loop = asyncio.get_running_loop()
    q = SimpleQuery(sql)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, q.request())
            while not q.done:
                q.feed(await _recv(sock))
    except OSError as exc:
        if _is_deadline(exc):
            raise BackendQueryError(f"query {sql[:80]!r}: no answer within {timeout:g} s") from exc
        raise BackendQueryError(f"query {sql[:80]!r}: {_os_reason(exc)}") from exc
    except ProtocolError as exc:
        raise BackendQueryError(f"query {sql[:80]!r}: {exc}") from exc
    extra = q.leftover()
    if extra:
        # Handing the socket on with these bytes dropped would misalign the next reader's stream.
        raise BackendQueryError(
            f"query {sql[:80]!r}: server sent {len(extra)} unexpected bytes after ReadyForQuery"
        )
    return q
