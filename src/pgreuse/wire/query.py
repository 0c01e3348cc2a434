"""Sans-IO simple-protocol query runner, for the broker's own reset and health-check queries.

Contract: send :meth:`SimpleQuery.request`, feed every chunk received to :meth:`SimpleQuery.feed`
until :attr:`SimpleQuery.done` (ReadyForQuery). No I/O here. A server error does not raise: it is
stored in :attr:`SimpleQuery.error` and the backend is still usable if ``transaction_status`` says
so, because the caller decides whether a failed reset means "close this backend".

Results are kept as text and meant for small result sets (``select 1``, ``show ...``). COPY and
extended-protocol messages are not expected here and raise :class:`ProtocolError`: the backend is
then in an unknown state and must be closed.
"""

from __future__ import annotations

import struct

from pgreuse.wire import frames
from pgreuse.wire.frames import ErrorFields, Message, ProtocolError

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


class SimpleQuery:
    """One Query message (possibly several statements) and everything the server answers to it."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self._reader = frames.FrameReader()
        self.done = False
        # The first error only: after it the server skips the remaining statements anyway.
        self.error: ErrorFields | None = None
        self.transaction_status = b""
        self.command_tags: list[str] = []
        self.rows: list[list[str | None]] = []
        self.notices: list[ErrorFields] = []
        self.parameters: dict[str, str] = {}
        self.notifications = 0
        self.empty_queries = 0

    def __repr__(self) -> str:
        return (
            f"<SimpleQuery {self.sql[:40]!r} done={self.done} tags={self.command_tags} "
            f"error={self.error.summary() if self.error else None}>"
        )

    def request(self) -> bytes:
        """The Query message to send."""
        return frames.query(self.sql)

    def feed(self, data: bytes) -> None:
        """Consume bytes from the server; stops at ReadyForQuery.

        Raises:
            ProtocolError: malformed messages, or messages a simple query cannot produce (COPY,
                extended protocol), after which the backend must be closed.
        """
        self._reader.feed(data)
        while not self.done:
            msg = self._reader.next_message()
            if msg is None:
                return
            self._handle(msg)

    def leftover(self) -> bytes:
        """Bytes received after ReadyForQuery (normally none)."""
        return self._reader.rest()

    def _handle(self, msg: Message) -> None:
        kind = msg.type
        if kind == b"D":
            self.rows.append(parse_data_row(msg.body))
        elif kind == b"T":
            pass  # column names and types: text results need neither
        elif kind == b"C":
            tag, _ = frames.read_cstring(msg.body, 0, "CommandComplete tag")
            self.command_tags.append(tag.decode("utf-8", "replace"))
        elif kind == b"I":
            self.empty_queries += 1
        elif kind == b"E":
            if self.error is None:
                self.error = ErrorFields.from_body(msg.body)
        elif kind == b"N":
            self.notices.append(ErrorFields.from_body(msg.body))
        elif kind == b"S":
            name, value = frames.parse_parameter_status(msg.body)
            self.parameters[name] = value
        elif kind == b"A":
            # A NOTIFY for a channel someone LISTENed on: on a pooled backend that means session
            # state leaked; the caller may count it, the payload is of no use here.
            self.notifications += 1
        elif kind == b"Z":
            if msg.body not in (b"I", b"T", b"E"):
                raise ProtocolError(f"ReadyForQuery with invalid status {msg.body!r}")
            self.transaction_status = msg.body
            self.done = True
        else:
            raise ProtocolError(
                f"unexpected message type {kind!r} in response to simple query {self.sql[:80]!r}"
            )


def parse_data_row(body: bytes) -> list[str | None]:
    """Text values of a DataRow body (``None`` for SQL NULL), decoded as UTF-8.

    Raises:
        ProtocolError: the column count or a value length does not fit the body.
    """
    if len(body) < 2:
        raise ProtocolError(f"DataRow body has {len(body)} bytes (minimum 2)")
    (count,) = _I16.unpack_from(body, 0)
    if count < 0:
        raise ProtocolError(f"DataRow has negative column count {count}")
    values: list[str | None] = []
    pos = 2
    for i in range(count):
        if pos + 4 > len(body):
            raise ProtocolError(f"DataRow truncated before column {i} of {count}")
        (length,) = _I32.unpack_from(body, pos)
        pos += 4
        if length == -1:
            values.append(None)
            continue
        if length < 0 or pos + length > len(body):
            raise ProtocolError(f"DataRow column {i} has invalid length {length}")
        values.append(body[pos : pos + length].decode("utf-8", "replace"))
        pos += length
    if pos != len(body):
        raise ProtocolError(f"DataRow has {len(body) - pos} trailing bytes after {count} columns")
    return values
