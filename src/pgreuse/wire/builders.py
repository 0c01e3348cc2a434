"""The bytes of the messages pgreuse writes: :func:`frame` for a typed message, the untyped requests
(startup, SSL, GSSENC, cancel), and the messages the broker and its backend logins send.

Writing only: nothing here reads bytes, so the parsers' rules (:mod:`pgreuse.wire.parsers`) and the
encoders' each read on their own; :mod:`pgreuse.wire.frames` re-exports every public name. Performs
no I/O; a string the protocol cannot carry (a NUL inside) raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .protocol import _I32, _TWO_U32, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE


def _cstring(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        # A NUL would end the string early and shift every field after it.
        raise ValueError(f"string {text!r} contains a NUL byte, which the protocol cannot carry")
    return raw + b"\0"


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
