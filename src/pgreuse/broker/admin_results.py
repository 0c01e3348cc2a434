"""The admin console's answers as PostgreSQL result rows: RowDescription, DataRow, CommandComplete.

Contract: a :class:`Result` is what one console command answers (a result set, or only a command
tag, with notices first); :meth:`Result.encode` gives the backend messages for it, every column in
text format and typed ``int8`` or ``text``. Performs no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs

from ..wire import frames

INT8 = 20
TEXT = 25
_TYPE_LEN = {INT8: 8, TEXT: -1}
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")


@attrs.frozen
class Result:
    """What one command answers: a result set (``columns`` non-empty) or only a command tag."""

    tag: str
    columns: tuple[tuple[str, int], ...] = ()
    rows: tuple[tuple[object, ...], ...] = ()
    notices: tuple[str, ...] = ()

    def encode(self) -> bytes:
        out = [frames.notice_response("00000", n) for n in self.notices]
        if self.columns:
            out.append(row_description(self.columns))
            out.extend(data_row(r) for r in self.rows)
        out.append(frames.frame(b"C", self.tag.encode() + b"\0"))
        return b"".join(out)


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns of type ``int8`` or ``text``."""
    body = [_I16.pack(len(columns))]
    for name, oid in columns:
        body.append(name.encode() + b"\0" + _FIELD.pack(0, 0, oid, _TYPE_LEN[oid], -1, 0))
    return frames.frame(b"T", b"".join(body))


def data_row(values: Sequence[object]) -> bytes:
    """DataRow in text format; ``None`` is SQL NULL."""
    body = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            body.append(_I32.pack(-1))
            continue
        raw = str(v).encode()
        body.append(_I32.pack(len(raw)) + raw)
    return frames.frame(b"D", b"".join(body))
