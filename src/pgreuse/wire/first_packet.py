"""The untyped first packet(s) of a client connection, and :class:`StartupReader`, which reads them.

``int32 length, int32 code, payload``: a StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
Only the broker's client side reads this framing, once per connection and under rules of its own
(:data:`~pgreuse.wire.protocol.MAX_STARTUP`, one request of each kind, nothing sent before the answer),
so it lives apart from the typed messages; :mod:`pgreuse.wire.frames` re-exports its names.
Performs no I/O.
"""

from __future__ import annotations

import attrs

from .protocol import (
    _I32,
    _TWO_U32,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP,
    SSL_REQUEST_CODE,
    ProtocolError,
)


@attrs.frozen
class StartupMessage:
    """A client's StartupMessage: protocol version and its parameters (user, database, ...)."""

    version_major: int
    version_minor: int
    params: dict[str, str]


@attrs.frozen
class SSLRequest:
    """The client asks for TLS; it waits for one byte, ``S`` or ``N``, before sending more."""


@attrs.frozen
class GSSENCRequest:
    """The client asks for GSSAPI encryption; it waits for ``G`` or ``N`` before sending more."""


@attrs.frozen
class CancelRequest:
    """A cancel request carrying the key from BackendKeyData; the connection has no other use."""

    pid: int
    secret: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


class StartupReader:
    """Read the untyped first packet(s) of a client connection. Performs no I/O.

    Call :meth:`next_packet` after each :meth:`feed`. An ``SSLRequest`` or ``GSSENCRequest`` is
    followed by another packet once answered, so the reader keeps going; a ``StartupMessage`` or a
    ``CancelRequest`` ends the untyped phase (:attr:`done`), after which :meth:`rest` returns what
    the client already pipelined (typed messages for a :class:`FrameReader`).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ssl_seen = False
        self._gss_seen = False
        self.done = False

    def __repr__(self) -> str:
        return f"<StartupReader buffered={len(self._buf)} done={self.done}>"

    def feed(self, data: bytes) -> None:
        """Append bytes received from the client."""
        self._buf += data

    def next_packet(self) -> StartupPacket | None:
        """Return the next complete packet, or ``None`` when more bytes are needed (or done).

        Raises:
            ProtocolError: bad length, unknown code or protocol version, malformed parameters,
                bytes sent after an encryption request before its answer, or a repeated request.
        """
        if self.done:
            return None
        buf = self._buf
        if buf[:1] == b"\x16":
            # A TLS ClientHello: libpq >= 17 with sslnegotiation=direct skips the SSLRequest.
            raise ProtocolError(
                "received a TLS handshake without SSLRequest (sslnegotiation=direct), "
                "which is not supported: use sslnegotiation=postgres"
            )
        if len(buf) < 4:
            return None
        (length,) = _I32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP:
            raise ProtocolError(
                f"invalid startup packet length {length} (must be between 8 and {MAX_STARTUP})"
            )
        if len(buf) < length:
            return None
        packet = bytes(buf[:length])
        del buf[:length]
        (code,) = _I32.unpack_from(packet, 4)
        payload = packet[8:]
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            return self._encryption_request(code, payload)
        if code == CANCEL_REQUEST_CODE:
            if len(payload) != 8:
                raise ProtocolError(f"invalid CancelRequest length {length} (expected 16)")
            pid, secret = _TWO_U32.unpack(payload)
            self.done = True
            return CancelRequest(pid, secret)
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            raise ProtocolError(
                f"unsupported frontend protocol {major}.{minor} (code {code}): only protocol 3.x is supported"
            )
        params = _parse_startup_params(payload)
        self.done = True
        return StartupMessage(major, minor, params)

    def _encryption_request(self, code: int, payload: bytes) -> SSLRequest | GSSENCRequest:
        is_ssl = code == SSL_REQUEST_CODE
        name = "SSLRequest" if is_ssl else "GSSENCRequest"
        if payload:
            raise ProtocolError(f"invalid {name} length {8 + len(payload)} (expected 8)")
        if self._buf:
            # The client must wait for our answer. Bytes already here were sent before it: accepting
            # them would let a man in the middle inject plaintext into a session that later turns
            # encrypted (the class of bug fixed in PostgreSQL as CVE-2021-23214).
            raise ProtocolError(f"received {len(self._buf)} unencrypted bytes after {name} before its answer")
        if self._ssl_seen if is_ssl else self._gss_seen:
            raise ProtocolError(f"received a second {name} on the same connection")
        if is_ssl:
            self._ssl_seen = True
            return SSLRequest()
        self._gss_seen = True
        return GSSENCRequest()

    def rest(self) -> bytes:
        """Return and forget the bytes received after the last packet returned."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


def _parse_startup_params(payload: bytes) -> dict[str, str]:
    # name\0value\0 ... \0 : the final lone NUL is mandatory and must be the last byte.
    params: dict[str, str] = {}
    pos = 0
    end = len(payload)
    while True:
        if pos >= end:
            raise ProtocolError("invalid startup packet layout: missing the final NUL terminator")
        if payload[pos] == 0:
            if pos != end - 1:
                raise ProtocolError(
                    f"invalid startup packet layout: {end - pos - 1} bytes after the terminator"
                )
            return params
        name_end = payload.find(b"\0", pos)
        if name_end < 0:
            raise ProtocolError(f"startup parameter name {payload[pos : pos + 64]!r} is not NUL-terminated")
        value_end = payload.find(b"\0", name_end + 1)
        if value_end < 0:
            raise ProtocolError(f"value of startup parameter {payload[pos:name_end]!r} is not NUL-terminated")
        name = _decode_strict(payload[pos:name_end], "startup parameter name")
        params[name] = _decode_strict(payload[name_end + 1 : value_end], f"startup parameter {name}")
        pos = value_end + 1


def _decode_strict(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} {raw[:64]!r} is not valid UTF-8") from exc
