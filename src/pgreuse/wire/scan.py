"""Walking the server's message stream by its headers: the proxy's one loop per message.

The proxy forwards what the server sends unchanged and reads only message headers (type byte and
length), to learn three things: how many ReadyForQuery messages arrived and the last one's
transaction status, whether a ParameterStatus arrived (a ``SET`` changed session state), and where
the next message begins when a read ends inside one.

:func:`scan_server_py` is the reference. ``pgreuse._speedups.scan_server`` is the same function in
C, used when it was built (``pip install`` compiles it where a C compiler is present) unless the
environment sets ``PGREUSE_PURE_PYTHON=1``; :data:`IMPLEMENTATION` says which one runs. The two are
compared on the same streams, cut at every byte, by ``tests/wire/test_scan.py``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

# Flags in scan_server's result.
SAW_PARAMETER_STATUS = 1
BAD_LENGTH = 2  # the message at the returned position has a length below 4
UNSOLICITED_READY = 4  # the ReadyForQuery at the returned position answers no sync point

_HEADER = struct.Struct("!Bi")
_WATCHED = frozenset(b"ZS")  # ReadyForQuery, ParameterStatus
_Z = ord("Z")


def scan_server_py(data: bytes | bytearray | memoryview, pos: int, syncs: int) -> tuple[int, int, int, int]:
    """Walk the messages of ``data`` from ``pos``, a message start, with ``syncs`` sync points
    unanswered. Returns ``(pos, syncs, tx, flags)``:

    * ``pos``: where the walk stopped: the start of the first message whose header and first body
      byte (ReadyForQuery's status) are not all in ``data`` (possibly ``len(data)``), or past the
      end of ``data`` by what is left of a message cut short; on an error, the bad message's start;
    * ``syncs``: less one per ReadyForQuery;
    * ``tx``: the last ReadyForQuery's status byte, or -1 if none was seen;
    * ``flags``: :data:`SAW_PARAMETER_STATUS`, :data:`BAD_LENGTH`, :data:`UNSOLICITED_READY`.
    """
    tx = -1
    flags = 0
    unpack = _HEADER.unpack_from
    last = len(data) - 6
    while pos <= last:
        type_, length = unpack(data, pos)
        if type_ in _WATCHED:
            if type_ == _Z:
                tx = data[pos + 5]
                syncs -= 1
                if syncs < 0:
                    flags |= UNSOLICITED_READY
                    break
            else:
                flags |= SAW_PARAMETER_STATUS
        if length < 4:  # (no upper bound: server messages are forwarded, never buffered whole)
            flags |= BAD_LENGTH
            break
        pos += 1 + length
    return pos, syncs, tx, flags


ScanServer = Callable[[bytes | bytearray | memoryview, int, int], tuple[int, int, int, int]]
scan_server: ScanServer = scan_server_py
IMPLEMENTATION = "python"
if os.environ.get("PGREUSE_PURE_PYTHON", "") in ("", "0"):
    try:
        from .._speedups import scan_server as _c_scan_server
    except ImportError:  # not built (no C compiler at install time): the reference serves
        pass
    else:
        scan_server = _c_scan_server
        IMPLEMENTATION = "c"
