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
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs

# The default cap on one typed message. PostgreSQL's own limit is 1 GiB (MaxAllocSize); the
# broker only reads small messages itself (startup, reset, health checks, frame headers in proxy
# mode), so a lower default bounds what one misbehaving peer can make it buffer. Readers take a max.
MAX_FRAME = 64 * 1024 * 1024

# PostgreSQL's MAX_STARTUP_PACKET_LENGTH: a longer first packet is rejected by the server too.
MAX_STARTUP = 10_000

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 1234 << 16 | 5680
CANCEL_REQUEST_CODE = 1234 << 16 | 5678

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!ci")
_TWO_U32 = struct.Struct("!II")


class ProtocolError(ValueError):
    """The peer sent bytes that are not valid PostgreSQL protocol.

    The connection the bytes came from can no longer be trusted: close it and log the message.
    """


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


# --- the untyped first packet ---------------------------------------------------------------------


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


def _cstring(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        # A NUL would end the string early and shift every field after it.
        raise ValueError(f"string {text!r} contains a NUL byte, which the protocol cannot carry")
    return raw + b"\0"


def read_cstring(body: bytes, pos: int, what: str = "string") -> tuple[bytes, int]:
    """Return the NUL-terminated bytes at ``pos`` (without the NUL) and the position after it.

    Raises:
        ProtocolError: no NUL before the end of ``body``.
    """
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(f"{what} {body[pos : pos + 64]!r} is not NUL-terminated")
    return body[pos:end], end + 1


# --- builders ------------------------------------------------------------------------------------


def frame(type_: bytes, body: bytes) -> bytes:
    """Encode one typed message."""
    if len(type_) != 1:
        raise ValueError(f"message type must be one byte, got {type_!r}")
    return type_ + _I32.pack(len(body) + 4) + body


def _untyped(code: int, payload: bytes) -> bytes:
    return _I32.pack(len(payload) + 8) + _I32.pack(code) + payload


def startup_message(params: Mapping[str, str], minor: int = 0) -> bytes:
    """StartupMessage for protocol 3.``minor`` with ``params`` (``user`` is required by servers)."""
    payload = b"".join(_cstring(k) + _cstring(v) for k, v in params.items()) + b"\0"
    return _untyped(PROTOCOL_3_0 | minor, payload)


def ssl_request() -> bytes:
    """SSLRequest."""
    return _untyped(SSL_REQUEST_CODE, b"")


def gssenc_request() -> bytes:
    """GSSENCRequest."""
    return _untyped(GSSENC_REQUEST_CODE, b"")


def cancel_request(pid: int, secret: int) -> bytes:
    """CancelRequest with the key a server sent in BackendKeyData."""
    return _untyped(CANCEL_REQUEST_CODE, _TWO_U32.pack(pid, secret))


def auth_ok() -> bytes:
    """AuthenticationOk."""
    return frame(b"R", _I32.pack(0))


def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus."""
    return frame(b"S", _cstring(name) + _cstring(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    """BackendKeyData with a 4-byte secret (protocol 3.0)."""
    return frame(b"K", _TWO_U32.pack(pid, secret))


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery; ``status``: ``b"I"`` idle, ``b"T"`` in transaction, ``b"E"`` failed."""
    if status not in (b"I", b"T", b"E"):
        raise ValueError(f"transaction status must be b'I', b'T' or b'E', got {status!r}")
    return frame(b"Z", status)


def _fields_body(severity: str, code: str, message: str, detail: str | None, hint: str | None) -> bytes:
    # S is the localized severity, V the untranslated one (PostgreSQL >= 9.6 sends both); we only
    # speak English, so both carry the same word.
    parts = [b"S" + _cstring(severity), b"V" + _cstring(severity), b"C" + _cstring(code)]
    parts.append(b"M" + _cstring(message))
    if detail is not None:
        parts.append(b"D" + _cstring(detail))
    if hint is not None:
        parts.append(b"H" + _cstring(hint))
    return b"".join(parts) + b"\0"


def error_response(
    code: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse with SQLSTATE ``code``; use ``severity="FATAL"`` before closing a client."""
    return frame(b"E", _fields_body(severity, code, message, detail, hint))


def notice_response(
    code: str,
    message: str,
    *,
    severity: str = "NOTICE",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """NoticeResponse (same fields as an ErrorResponse, but the session goes on)."""
    return frame(b"N", _fields_body(severity, code, message, detail, hint))


def negotiate_protocol_version(minor: int, unrecognized: list[str]) -> bytes:
    """NegotiateProtocolVersion: newest minor version we speak, ``_pq_.`` options we ignore."""
    body = _I32.pack(PROTOCOL_3_0 | minor) + _I32.pack(len(unrecognized))
    return frame(b"v", body + b"".join(_cstring(name) for name in unrecognized))


def password_message(data: bytes) -> bytes:
    """PasswordMessage: ``data`` is the NUL-terminated cleartext or md5 password."""
    return frame(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """SASLInitialResponse (type ``p`` too): mechanism name, then the client-first message."""
    return frame(b"p", _cstring(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    """SASLResponse: the client-final message."""
    return frame(b"p", data)


def query(sql: str) -> bytes:
    """Query (simple protocol)."""
    return frame(b"Q", _cstring(sql))


def terminate() -> bytes:
    """Terminate."""
    return frame(b"X", b"")


# --- parsers -------------------------------------------------------------------------------------


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code.

    Values are decoded as UTF-8 with replacement: they are for humans, and the server may send them
    in another encoding before client_encoding is set.

    Raises:
        ProtocolError: a field is not NUL-terminated or the final terminator is missing.
    """
    fields: dict[str, str] = {}
    pos = 0
    while True:
        if pos >= len(body):
            raise ProtocolError("error/notice fields lack the final NUL terminator")
        code = body[pos]
        if code == 0:
            return fields
        raw, pos = read_cstring(body, pos + 1, f"error field {chr(code)!r}")
        fields[chr(code)] = raw.decode("utf-8", "replace")


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    """Name and value of a ParameterStatus body.

    Raises:
        ProtocolError: not exactly two NUL-terminated strings.
    """
    name, pos = read_cstring(body, 0, "ParameterStatus name")
    value, pos = read_cstring(body, pos, f"ParameterStatus value of {name!r}")
    if pos != len(body):
        raise ProtocolError(f"ParameterStatus {name!r} has {len(body) - pos} trailing bytes")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    """Process id and secret key of a BackendKeyData body.

    Raises:
        ProtocolError: the body is not 8 bytes (a longer key means protocol >= 3.2, which we
            never request).
    """
    if len(body) != 8:
        raise ProtocolError(f"BackendKeyData body has {len(body)} bytes (expected 8)")
    pid, secret = _TWO_U32.unpack(body)
    return pid, secret


def parse_auth(body: bytes) -> tuple[int, bytes]:
    """Authentication request code (0 ok, 3 cleartext, 5 md5, 10 SASL, ...) and its payload.

    Raises:
        ProtocolError: the body is shorter than its 4-byte code.
    """
    if len(body) < 4:
        raise ProtocolError(f"authentication message body has {len(body)} bytes (minimum 4)")
    (code,) = _I32.unpack_from(body, 0)
    return code, body[4:]


@attrs.frozen
class ErrorFields:
    """The fields of an ErrorResponse or NoticeResponse, with the common ones named.

    ``str()`` prints like psql: ``FATAL:  password authentication failed for user "app"``, then
    DETAIL and HINT lines when present.
    """

    fields: dict[str, str]

    @classmethod
    def from_body(cls, body: bytes) -> ErrorFields:
        """Parse an ErrorResponse/NoticeResponse body (raises ProtocolError like the parser)."""
        return cls(parse_error_fields(body))

    @property
    def severity(self) -> str:
        """Untranslated severity (ERROR, FATAL, PANIC, WARNING, NOTICE, ...)."""
        return self.fields.get("V") or self.fields.get("S") or "ERROR"

    @property
    def sqlstate(self) -> str:
        """Five-character SQLSTATE, ``XX000`` (internal error) if the server sent none."""
        return self.fields.get("C", "XX000")

    @property
    def message(self) -> str:
        """Primary message."""
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        """Optional DETAIL."""
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        """Optional HINT."""
        return self.fields.get("H")

    def summary(self) -> str:
        """One line for logs and exception messages: ``FATAL:  message (SQLSTATE 28P01)``."""
        return f"{self._shown_severity()}:  {self.message} (SQLSTATE {self.sqlstate})"

    def _shown_severity(self) -> str:
        # psql shows the localized word (S); V is the fallback for messages built without it.
        return self.fields.get("S") or self.severity

    def __str__(self) -> str:
        lines = [f"{self._shown_severity()}:  {self.message}"]
        if self.detail is not None:
            lines.append(f"DETAIL:  {self.detail}")
        if self.hint is not None:
            lines.append(f"HINT:  {self.hint}")
        return "\n".join(lines)
