"""Open, cancel and query backend connections: the asyncio I/O driver around :mod:`pgreuse.wire`.

Contract: :func:`parse_target` turns a libpq-style conninfo (plus libpq's environment fallbacks)
into a :class:`BackendTarget`, refusing what the broker cannot do (several hosts, GSSAPI
encryption). :func:`open_backend` returns a non-blocking socket that finished startup and sits at
ReadyForQuery ``I`` with nothing unread — wrapped in a :class:`~.tls.TLSStream` when the
connection is encrypted, following libpq's ``sslmode`` (disable/allow/prefer/require/verify-ca/
verify-full; ignored on Unix sockets, as libpq does) — or raises :class:`BackendConnectError`
naming the target and the cause, with the socket closed. :func:`run_simple_query` drives one
simple query on such a backend; on :class:`BackendQueryError` the backend's protocol state is
unknown and it must be closed.

This is the I/O boundary: ``OSError`` and timeouts become these errors here (``raise ... from``),
and cancellation always propagates after closing what was opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import socket
import ssl
from collections.abc import Mapping

import attrs
import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgreuse.wire import frames
from pgreuse.wire.auth import AuthError
from pgreuse.wire.frames import ProtocolError
from pgreuse.wire.query import SimpleQuery
from pgreuse.wire.startup import BackendStartup, StartupFailed

from .tls import REQUIRED_MODES, SSLMODES, TLSConfigError, TLSServerRefused, TLSStream, make_context

logger = logging.getLogger("pgreuse.broker")

# libpq's compiled-in default on Debian/Ubuntu packages; other builds use /tmp.
DEFAULT_SOCKET_DIR = "/var/run/postgresql"
DEFAULT_PORT = 5432
# libpq waits forever without connect_timeout; a broker must not hang a pool slot, so it caps it.
DEFAULT_CONNECT_TIMEOUT = 10.0
_RECV_SIZE = 65536
# A backend connection: a plaintext socket, or a TLS stream over one.
Stream = socket.socket | TLSStream


class BackendConnectError(Exception):
    """A backend connection could not be opened; the message names the target and the cause."""


class BackendQueryError(Exception):
    """A query on a backend failed at the I/O or protocol level; close that backend."""


class EncryptionNotSupported(ValueError):
    """The conninfo asks for GSSAPI encryption, which the broker does not implement."""


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
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    sslpassword: str | None = attrs.field(default=None, repr=False)
    # The name TLS checks the certificate against (and sends as SNI): ``host`` even when
    # ``hostaddr`` says where to connect, as in libpq.
    server_name: str | None = None

    @property
    def tls_possible(self) -> bool:
        """Backends may be encrypted (TCP, sslmode other than disable): handoff may be impossible."""
        return not self.is_unix and self.sslmode != "disable"

    @property
    def tls_required(self) -> bool:
        """Every backend is encrypted (sslmode require/verify-ca/verify-full over TCP)."""
        return not self.is_unix and self.sslmode in REQUIRED_MODES

    def ssl_context(self) -> ssl.SSLContext:
        """The SSL context for this target's settings; raises :class:`~.tls.TLSConfigError`."""
        return make_context(
            self.sslmode,
            sslrootcert=self.sslrootcert,
            sslcert=self.sslcert,
            sslkey=self.sslkey,
            sslpassword=self.sslpassword,
        )

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
    # Set when the connection is encrypted: read and write through it, never the bare socket.
    tls: TLSStream | None = None

    @property
    def stream(self) -> Stream:
        return self.tls if self.tls is not None else self.sock


def parse_target(conninfo: str, env: Mapping[str, str] = os.environ) -> BackendTarget:
    """Build a :class:`BackendTarget` from a conninfo string or URI, the way libpq would.

    Unset keys fall back to PGHOST, PGHOSTADDR, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE,
    PGSSLROOTCERT, PGSSLCERT, PGSSLKEY, PGGSSENCMODE, PGOPTIONS, PGCONNECT_TIMEOUT, PGAPPNAME,
    PGCLIENTENCODING, then to libpq's defaults (Unix socket in /var/run/postgresql, port 5432, the
    OS user, database = user, sslmode=prefer, certificates in ``~/.postgresql``).
    ``connect_timeout`` 0 or unset means 10 s rather than libpq's "forever".

    Raises:
        ValueError: unparsable conninfo, several hosts, bad port/timeout/sslmode.
        TLSConfigError: TLS settings that cannot work (a verifying sslmode without a root
            certificate, an unreadable certificate or key).
        EncryptionNotSupported: gssencmode=require (the broker does not do GSSAPI encryption).
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

    server_name = host if host is not None and not host.startswith("/") else None
    if hostaddr is not None:
        # libpq connects to hostaddr and uses host only for authentication and TLS names.
        server_name = server_name or hostaddr
        host, is_unix = hostaddr, False
    else:
        host = host or DEFAULT_SOCKET_DIR
        is_unix = host.startswith("/")

    user = get("user", "PGUSER") or _login_name()
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
    if sslmode not in SSLMODES:
        raise ValueError(f"invalid sslmode {sslmode!r}: expected one of {', '.join(SSLMODES)}")
    sslrootcert = get("sslrootcert", "PGSSLROOTCERT")
    if sslrootcert == "system" and get("sslmode", "PGSSLMODE") is None:
        sslmode = "verify-full"  # libpq 16: the system's roots imply verify-full by default

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
        sslrootcert=sslrootcert,
        sslcert=get("sslcert", "PGSSLCERT"),
        sslkey=get("sslkey", "PGSSLKEY"),
        sslpassword=get("sslpassword"),
        server_name=server_name or (None if is_unix else host),
    )
    if (get("gssencmode", "PGGSSENCMODE") or "prefer") == "require":
        raise EncryptionNotSupported(
            f"{target.address()}: gssencmode=require asks for GSSAPI encryption, which the pgreuse "
            "broker does not implement: use sslmode=require (or verify-full) for an encrypted "
            "backend connection, or drop gssencmode"
        )
    if target.tls_possible:
        target.ssl_context()  # a missing or unreadable certificate fails now, naming the file
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


async def _send(stream: Stream, data: bytes) -> None:
    if isinstance(stream, TLSStream):
        await stream.sendall(data)
    else:
        await asyncio.get_running_loop().sock_sendall(stream, data)


async def _recv(stream: Stream) -> bytes:
    if isinstance(stream, TLSStream):
        data = await stream.recv_some()
    else:
        data = await asyncio.get_running_loop().sock_recv(stream, _RECV_SIZE)
    if not data:
        raise ConnectionResetError("server closed the connection unexpectedly")
    return data


def _os_reason(exc: OSError) -> str:
    # asyncio's sock_connect puts "Connect call failed (addr)" in strerror; the errno text is the
    # useful part, and the caller's message already names the address.
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"  # its errno is OpenSSL's, not the OS's
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _is_deadline(exc: BaseException) -> bool:
    # asyncio.timeout() raises a bare TimeoutError; an OS-level ETIMEDOUT is also a TimeoutError
    # but carries an errno, and is reported as the OS error it is.
    return isinstance(exc, TimeoutError) and exc.errno is None


class _Downgrade(Exception):
    """This attempt failed in a way libpq answers by retrying with the other transport."""


async def _negotiate_tls(sock: socket.socket, target: BackendTarget) -> TLSStream:
    """SSLRequest, then the handshake; :class:`TLSServerRefused` if the server answers ``N``."""
    loop = asyncio.get_running_loop()
    ctx = target.ssl_context()
    await loop.sock_sendall(sock, frames.ssl_request())
    # Exactly one byte: anything after 'S' must be read by the TLS layer, which authenticates it.
    answer = await loop.sock_recv(sock, 1)
    if answer == b"N":
        raise TLSServerRefused("the server does not accept TLS connections (it answered N)")
    if answer != b"S":
        raise ProtocolError(f"server answered the SSLRequest with {answer!r}, expected S or N")
    stream = TLSStream(sock, ctx, target.server_name)
    await stream.handshake()
    return stream


def _tls_reason(exc: ssl.SSLError, target: BackendTarget) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        if "mismatch" in why.lower():
            return (
                f"TLS: the server's certificate is not valid for host {target.server_name!r} "
                f"({why}); sslmode=verify-full checks the host name: connect with a name the "
                "certificate lists, or use sslmode=verify-ca to check the chain only"
            )
        return (
            f"TLS: the server's certificate failed verification ({why}) against "
            f"sslrootcert={target.sslrootcert!r} (sslmode={target.sslmode}): give the CA that "
            "signed the server's certificate"
        )
    return f"TLS handshake failed: {exc.reason or exc}"


def _attempts(target: BackendTarget, plaintext_first: bool) -> list[bool]:
    """Whether each connection attempt starts with TLS, in libpq's order for the sslmode."""
    if not target.tls_possible:
        return [False]
    if target.tls_required:
        return [True]
    if target.sslmode == "allow" or plaintext_first:
        return [False, True]
    return [True, False]  # prefer: 'N' continues in plaintext on the same connection


async def open_backend(
    target: BackendTarget, *, extra_options: str | None = None, plaintext_first: bool = False
) -> OpenedBackend:
    """Connect to ``target`` and complete startup and authentication.

    ``extra_options`` is appended to the startup ``options`` (for example
    ``"-c idle_in_transaction_session_timeout=5000"``). The whole operation is bounded by
    ``target.connect_timeout``. TLS follows libpq: ``prefer`` tries TLS, goes on in plaintext when
    the server answers ``N`` and retries in plaintext when the TLS attempt fails; ``allow`` (or
    ``plaintext_first``, for a pool that must stay plaintext under ``prefer``) tries plaintext
    first and retries with TLS when the server refuses it.

    Raises:
        BackendConnectError: any failure (refused, timeout, server error such as a wrong password,
            unsupported authentication, TLS refused or unverifiable, bad bytes); the socket is
            closed.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    where = f"cannot open a backend on {target.describe()}"
    plan = _attempts(target, plaintext_first)
    try:
        async with asyncio.timeout(target.connect_timeout):
            for n, use_tls in enumerate(plan):
                may_retry = n + 1 < len(plan)
                try:
                    return await _open_once(target, extra_options, use_tls, may_retry, started)
                except _Downgrade as exc:
                    logger.info("%s: %s; retrying %s", where, exc.__cause__,
                                "in plaintext" if use_tls else "with TLS")  # fmt: skip
            raise AssertionError("unreachable: the last attempt never downgrades")  # pragma: no cover
    except BaseException as exc:
        if isinstance(exc, TLSConfigError):
            raise BackendConnectError(f"{where}: {exc}") from exc
        if isinstance(exc, ssl.SSLError):
            raise BackendConnectError(f"{where}: {_tls_reason(exc, target)}") from exc
        if isinstance(exc, TLSServerRefused):
            raise BackendConnectError(
                f"{where}: sslmode={target.sslmode} requires TLS, but {exc}: enable ssl on the "
                "server, or lower sslmode"
            ) from exc
        if isinstance(exc, StartupFailed | AuthError | ProtocolError):
            raise BackendConnectError(f"{where}: {exc}") from exc
        if _is_deadline(exc):
            raise BackendConnectError(
                f"{where}: no answer within {target.connect_timeout:g} s (connect_timeout)"
            ) from exc
        if isinstance(exc, OSError):
            raise BackendConnectError(f"{where}: {_os_reason(exc)}") from exc
        raise


async def _open_once(
    target: BackendTarget,
    extra_options: str | None,
    use_tls: bool,
    may_retry: bool,
    started: float,
) -> OpenedBackend:
    loop = asyncio.get_running_loop()
    startup = BackendStartup(startup_params(target, extra_options), target.password)
    sock: socket.socket | None = None
    tls: TLSStream | None = None
    try:
        sock = await _connect(target)
        if use_tls:
            try:
                tls = await _negotiate_tls(sock, target)
            except TLSServerRefused:
                if target.tls_required:
                    raise
                # prefer: libpq goes on in plaintext on this same connection.
            except ssl.SSLError as exc:
                if may_retry:
                    raise _Downgrade from exc
                raise
        stream: Stream = tls if tls is not None else sock
        await _send(stream, startup.initial_bytes())
        try:
            while not startup.done:
                reply = startup.feed(await _recv(stream))
                if reply:
                    await _send(stream, reply)
        except StartupFailed as exc:
            # libpq: a server that refuses one transport (pg_hba hostssl / hostnossl) may accept
            # the other, so allow and prefer retry once with it.
            if may_retry:
                raise _Downgrade from exc
            raise
        extra = startup.leftover()
        if extra or (tls is not None and tls.buffered()):
            raise ProtocolError(f"server sent {len(extra)} unexpected bytes after ReadyForQuery")
        if startup.transaction_status != b"I":
            raise ProtocolError(f"server is not idle after startup (status {startup.transaction_status!r})")
        opened = OpenedBackend(
            sock=sock,
            parameters=dict(startup.parameters),
            backend_pid=startup.backend_pid,
            backend_secret=startup.backend_secret,
            connect_seconds=loop.time() - started,
            tls=tls,
        )
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    logger.debug(
        "opened backend pid %d on %s in %.1f ms (auth %s), %s",
        opened.backend_pid,
        target.describe(),
        opened.connect_seconds * 1000,
        startup.auth_method,
        f"TLS {tls.describe()}" if tls is not None else "plaintext",
    )
    return opened


async def send_cancel(target: BackendTarget, pid: int, secret: int, *, tls: bool = False) -> None:
    """Ask the server to cancel what backend ``pid`` is running (a new connection, then closed).

    ``tls``: the backend's own connection is encrypted, so the cancel key travels encrypted too
    (as libpq >= 17 does); a server that answers ``N`` gets it in plaintext unless sslmode
    requires TLS. Like libpq, wait until the server closes the connection: it has then processed
    the request. Success says nothing about whether a query was actually running.

    Raises:
        BackendConnectError: the cancel connection could not be made or timed out.
    """
    where = f"cannot send a cancel request for pid {pid} to {target.describe()}"
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(target.connect_timeout):
            sock = await _connect(target)
            stream: Stream = sock
            if tls:
                try:
                    stream = await _negotiate_tls(sock, target)
                except TLSServerRefused:
                    if target.tls_required:
                        raise
            await _send(stream, frames.cancel_request(pid, secret))
            with contextlib.suppress(ConnectionResetError):
                while await _recv(stream):
                    pass
    except (OSError, TLSServerRefused, TLSConfigError, ProtocolError) as exc:
        if _is_deadline(exc):
            raise BackendConnectError(
                f"{where}: no answer within {target.connect_timeout:g} s (connect_timeout)"
            ) from exc
        if isinstance(exc, ssl.SSLError):
            raise BackendConnectError(f"{where}: {_tls_reason(exc, target)}") from exc
        if isinstance(exc, OSError):
            raise BackendConnectError(f"{where}: {_os_reason(exc)}") from exc
        raise BackendConnectError(f"{where}: {exc}") from exc
    finally:
        if sock is not None:
            sock.close()


async def run_simple_query(sock: Stream, sql: str, timeout: float) -> SimpleQuery:
    """Run ``sql`` with the simple protocol on an idle backend (socket or TLS stream).

    A server error is not raised: look at ``.error`` and ``.transaction_status``.

    Raises:
        BackendQueryError: I/O error, timeout, connection closed, malformed answer, or bytes after
            ReadyForQuery; the backend's state is unknown and it must be closed (not done here:
            the caller owns the socket).
    """
    q = SimpleQuery(sql)
    try:
        async with asyncio.timeout(timeout):
            await _send(sock, q.request())
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


def _login_name() -> str:
    """libpq's default user: this process's login name."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no $LOGNAME/$USER (OSError from Python 3.13)
        raise ValueError(
            f"no user= given, and this process's uid {os.geteuid()} has no user name to default "
            "to (no passwd entry, no $USER); set user= in the DSN or PGUSER"
        ) from None
