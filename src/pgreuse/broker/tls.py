"""TLS to backends: libpq's ``sslmode`` policy, the SSL context, and a non-blocking TLS stream.

Contract:

* :func:`make_context` builds the :class:`ssl.SSLContext` libpq would use for a target's
  ``sslmode``/``sslrootcert``/``sslcert``/``sslkey``/``sslpassword``, or raises :class:`TLSConfigError`
  naming the setting and the file. ``verify-full`` checks the chain and the host name, ``verify-ca``
  the chain only, ``require``/``prefer``/``allow`` nothing — except that ``require`` with a root
  certificate present verifies the chain, as libpq does.
* :class:`TLSStream` is a connected TCP socket plus an :class:`ssl.SSLObject` over memory BIOs. It
  offers the subset of the socket API the broker uses on a backend (``send``/``recv``/``fileno``),
  non-blocking with ``BlockingIOError``, plus ``sendall``/``recv_some`` coroutines for startup,
  reset and cancel. Plaintext is never buffered by the stream: ``recv`` returns everything that
  could be decrypted, so a level-triggered readiness watch on the raw socket stays truthful.
  Ciphertext that the kernel did not take yet waits in the stream (:attr:`TLSStream.wants_write`):
  the owner must watch for writability and call :meth:`TLSStream.flush`.

A TLS backend's socket carries ciphertext whose state lives in this process, so it can never be
handed off to a worker (DESIGN.md §3 rule 10): only the broker's proxy can serve such a pool.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Modes in which the connection must be encrypted (no plaintext fallback).
REQUIRED_MODES = ("require", "verify-ca", "verify-full")
_RAW = 65536
# A TLS record carries at most 16 KiB of plaintext; reading more per call drains a whole record.
_PLAIN = 256 * 1024


class TLSConfigError(ValueError):
    """The TLS settings of the backend conninfo cannot be used (missing file, bad key, bad mode)."""


class TLSServerRefused(Exception):
    """The server answered ``N`` to SSLRequest: it does not accept TLS connections."""


def default_file(name: str) -> str:
    """libpq's default location for ``name`` in the broker user's ``~/.postgresql``."""
    return os.path.join(os.path.expanduser("~"), ".postgresql", name)


def make_context(
    sslmode: str,
    *,
    sslrootcert: str | None,
    sslcert: str | None,
    sslkey: str | None,
    sslpassword: str | None,
) -> ssl.SSLContext:
    """The client-side SSL context for these libpq settings (``None``: libpq's default file).

    Raises:
        TLSConfigError: a verifying mode without a root certificate, an unreadable certificate or
            key, a wrong key password, ``sslrootcert=system`` with a weaker mode than verify-full.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # libpq's ssl_min_protocol_version default
    root = sslrootcert or default_file("root.crt")
    verify = sslmode in ("verify-ca", "verify-full")
    if root == "system":
        if sslmode != "verify-full":
            raise TLSConfigError(
                f"sslrootcert=system needs sslmode=verify-full, got sslmode={sslmode}: the system's "
                "roots vouch for host names, so verifying only the chain would trust any of them"
            )
        ctx.load_default_certs()
    elif os.path.exists(root):
        # libpq: a root certificate that exists is used, and makes 'require' verify the chain.
        verify = verify or sslmode == "require"
        if verify:
            try:
                ctx.load_verify_locations(cafile=root)
            except (OSError, ssl.SSLError) as exc:
                raise TLSConfigError(f"sslrootcert {root!r} cannot be loaded: {exc}") from exc
    elif verify:
        raise TLSConfigError(
            f"sslmode={sslmode} verifies the server's certificate, but the root certificate file "
            f"{root!r} does not exist: give sslrootcert=<CA file> (or sslrootcert=system), or use "
            "sslmode=require to encrypt without verification"
        )
    ctx.check_hostname = sslmode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    cert = sslcert or default_file("postgresql.crt")
    if sslcert is not None or os.path.exists(cert):
        key = sslkey or default_file("postgresql.key")
        try:
            ctx.load_cert_chain(cert, key, password=sslpassword)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(
                f"client certificate sslcert={cert!r} with sslkey={key!r} cannot be loaded: {exc} "
                "(a key with a passphrase needs sslpassword=...)"
            ) from exc
    return ctx


class TLSStream:
    """A TLS connection over a non-blocking socket (see the module docstring)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_name: str | None) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out_bio = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out_bio, server_hostname=server_name)
        self._out = bytearray()  # ciphertext the kernel has not taken yet
        self._eof = False

    def __repr__(self) -> str:
        return f"<TLSStream fd={self.sock.fileno()} {self.describe()} out={len(self._out)}>"

    def describe(self) -> str:
        """``TLSv1.3/TLS_AES_256_GCM_SHA384`` (PgBouncer's ``tls`` column), once connected."""
        cipher = self._obj.cipher()
        return f"{self._obj.version()}/{cipher[0]}" if cipher else "handshaking"

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        """Ciphertext waits for the socket to become writable (then call :meth:`flush`)."""
        return bool(self._out)

    def buffered(self) -> bool:
        """Bytes received and not yet returned by :meth:`recv` (a partial TLS record counts)."""
        return bool(self._in.pending or self._obj.pending())

    # -- handshake (driven by the connector) -------------------------------------------------------

    async def handshake(self) -> None:
        """Run the TLS handshake. Raises ``ssl.SSLError`` (an ``OSError``) or ``ConnectionError``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                await self._push(loop)
                return
            await self._push(loop)
            raw = await loop.sock_recv(self.sock, _RAW)
            if not raw:
                raise ConnectionResetError("server closed the connection during the TLS handshake")
            self._in.write(raw)

    # -- async, for startup / reset / cancel -------------------------------------------------------

    async def sendall(self, data: bytes) -> None:
        self._obj.write(data)
        await self._push(asyncio.get_running_loop())

    async def recv_some(self) -> bytes:
        """Plaintext as soon as some is there; ``b""`` at end of stream."""
        loop = asyncio.get_running_loop()
        while True:
            data = self._drain()
            if self._out:
                await self._push(loop)
            if data or self._eof:
                return data
            raw = await loop.sock_recv(self.sock, _RAW)
            if not raw:
                return b""
            self._in.write(raw)

    async def _push(self, loop: asyncio.AbstractEventLoop) -> None:
        self._out += self._out_bio.read()
        if self._out:
            data = bytes(self._out)
            self._out.clear()
            await loop.sock_sendall(self.sock, data)

    # -- non-blocking, for the proxy and the pool --------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt and send all of ``data`` (returns its length), or raise ``BlockingIOError`` while
        earlier ciphertext is still waiting for the socket (then nothing of ``data`` was taken)."""
        if self._out and not self.flush():
            raise BlockingIOError("earlier TLS records are still waiting for the socket")
        self._obj.write(data)
        self._out += self._out_bio.read()
        self.flush()
        return len(data)

    def flush(self) -> bool:
        """Send waiting ciphertext; True when none is left. Raises ``OSError`` if the socket fails."""
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return False
            del self._out[:n]
        return True

    def recv(self, _size: int = _PLAIN) -> bytes:
        """All plaintext that can be decrypted now; ``b""`` at end of stream; ``BlockingIOError``
        when only part of a record has arrived (the rest will make the socket readable again)."""
        while True:
            data = self._drain()
            if self._out:
                self.flush()
            if data or self._eof:
                return data
            raw = self.sock.recv(_RAW)  # BlockingIOError propagates: nothing to return yet
            if not raw:
                self._eof = True
                return b""
            self._in.write(raw)

    def _drain(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(_PLAIN)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: an orderly end of the TLS stream
                self._eof = True
                break
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
        self._out += self._out_bio.read()  # e.g. a KeyUpdate answer
        return b"".join(chunks)
