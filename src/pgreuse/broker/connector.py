"""Open, cancel and query backend connections: the asyncio I/O driver around :mod:`pgreuse.wire`.

Contract: :func:`open_backend` takes a :class:`~.backend_target.BackendTarget` (from
:func:`~.backend_target.parse_target`) and returns a non-blocking socket that finished startup
and sits at ReadyForQuery ``I`` with nothing unread — wrapped in a :class:`~.tls.TLSStream` when the
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
import logging
import os
import socket
import ssl

import attrs

from pgreuse.wire import frames
from pgreuse.wire.auth import AuthError
from pgreuse.wire.frames import ProtocolError
from pgreuse.wire.query import SimpleQuery
from pgreuse.wire.startup import BackendStartup, StartupFailed

from .backend_target import BackendTarget
from .tls import TLSConfigError, TLSServerRefused, TLSStream

logger = logging.getLogger("pgreuse.broker")

_RECV_SIZE = 65536
# A backend connection: a plaintext socket, or a TLS stream over one.
Stream = socket.socket | TLSStream


class BackendConnectError(Exception):
    """A backend connection could not be opened; the message names the target and the cause."""


class BackendQueryError(Exception):
    """A query on a backend failed at the I/O or protocol level; close that backend."""


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
