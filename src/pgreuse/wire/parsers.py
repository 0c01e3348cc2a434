"""The bodies of the typed messages pgreuse reads itself: ErrorResponse and NoticeResponse fields
(:class:`ErrorFields`), ParameterStatus, BackendKeyData, Authentication requests, and
:func:`read_cstring` for the strings inside them.

They take the body a :class:`~pgreuse.wire.frames.FrameReader` returned, so they hold no framing
state and live apart from it; :mod:`pgreuse.wire.frames` re-exports their names. Performs no I/O;
bad bytes raise :class:`~pgreuse.wire.protocol.ProtocolError`.
"""

from __future__ import annotations

import attrs

from .protocol import _I32, _TWO_U32, ProtocolError


def read_cstring(body: bytes, pos: int, what: str = "string") -> tuple[bytes, int]:
    """Return the NUL-terminated bytes at ``pos`` (without the NUL) and the position after it.

    Raises:
        ProtocolError: no NUL before the end of ``body``.
    """
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(f"{what} {body[pos : pos + 64]!r} is not NUL-terminated")
    return body[pos:end], end + 1


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
