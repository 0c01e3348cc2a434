"""PostgreSQL v3 message framing, and the messages pgreuse reads and writes.

Contract: bytes in, objects out; bytes out from builders. Nothing here does I/O or keeps a clock.
Every malformed input raises :class:`ProtocolError` (a ``ValueError``) whose message names the
offending value; the broker turns it into "close that client, log a line", so a parser must never
raise anything else on bad bytes and must never buffer more than its configured maximum.

Two framings exist on the wire (https://www.postgresql.org/docs/current/protocol-message-formats.html):

* the first packet a client sends is untyped: ``int32 length, int32 code, payload``
  (:class:`StartupReader`), and may be followed by another one after an SSLRequest/GSSENCRequest
  is answered ``N``;
* everything else is typed: ``byte type, int32 length, payload`` (:class:`FrameReader`).

The length counts itself but not the type byte.

The pieces live in small modules, each re-exported here so that callers keep one import:
:mod:`~pgreuse.wire.protocol` (limits, request codes, :class:`ProtocolError`),
:mod:`~pgreuse.wire.first_packet` (the untyped first packet), :mod:`~pgreuse.wire.builders` (bytes
out) and :mod:`~pgreuse.wire.parsers` (message bodies in). This module keeps the typed framing.
"""

from __future__ import annotations

import struct

import attrs

from .builders import (
    auth_ok,
    backend_key_data,
    cancel_request,
    error_response,
    frame,
    gssenc_request,
    negotiate_protocol_version,
    notice_response,
    parameter_status,
    password_message,
    query,
    ready_for_query,
    sasl_initial_response,
    sasl_response,
    ssl_request,
    startup_message,
    terminate,
)
from .first_packet import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    StartupReader,
)
from .parsers import (
    ErrorFields,
    parse_auth,
    parse_backend_key_data,
    parse_error_fields,
    parse_parameter_status,
    read_cstring,
)
from .protocol import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_FRAME,
    MAX_STARTUP,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    ProtocolError,
)

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_FRAME",
    "MAX_STARTUP",
    "PROTOCOL_3_0",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "ErrorFields",
    "FrameReader",
    "GSSENCRequest",
    "Message",
    "ProtocolError",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "StartupReader",
    "auth_ok",
    "backend_key_data",
    "cancel_request",
    "error_response",
    "frame",
    "gssenc_request",
    "negotiate_protocol_version",
    "notice_response",
    "parameter_status",
    "parse_auth",
    "parse_backend_key_data",
    "parse_error_fields",
    "parse_parameter_status",
    "password_message",
    "query",
    "read_cstring",
    "ready_for_query",
    "sasl_initial_response",
    "sasl_response",
    "ssl_request",
    "startup_message",
    "terminate",
]

_HEADER = struct.Struct("!ci")


@attrs.frozen
class Message:
    """One typed message: its type byte and its body (without type byte and length)."""

    type: bytes  # exactly one byte, e.g. b"Z"
    body: bytes

    def to_bytes(self) -> bytes:
        """Encode the message back to wire format."""
        return frame(self.type, self.body)


class FrameReader:
    """Split a byte stream into PostgreSQL v3 typed messages. Performs no I/O.

    Feed whatever a socket returned, then call :meth:`next_message` until it returns ``None``.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        # Consumed bytes are skipped by offset and only dropped in bulk, so reading many small
        # messages out of one large feed stays linear instead of shifting the buffer each time.
        self._pos = 0

    def __repr__(self) -> str:
        return f"<FrameReader buffered={self.buffered} max_frame={self.max_frame}>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` when more bytes are needed.

        Raises:
            ProtocolError: the length field is below 4 or above ``max_frame``. The stream cannot
                be resynchronised after that: the connection must be closed.
        """
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        type_, length = _HEADER.unpack_from(buf, pos)
        if length < 4:
            raise ProtocolError(f"message type {type_!r} has invalid length {length} (minimum 4)")
        if length > self.max_frame:
            raise ProtocolError(
                f"message type {type_!r} has length {length}, above the limit of {self.max_frame}"
            )
        end = pos + 1 + length
        if len(buf) < end:
            return None
        body = bytes(buf[pos + 5 : end])
        self._pos = end
        return Message(type_, body)

    def rest(self) -> bytes:
        """Return and forget the bytes that do not form a complete message yet."""
        data = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        return data
