"""Walking message streams by their headers: the proxy's loops over every message.

The proxy forwards what the server sends unchanged and reads only message headers (type byte and
length), to learn three things: how many ReadyForQuery messages arrived and the last one's
transaction status, whether a ParameterStatus arrived (a ``SET`` changed session state), and where
the next message begins when a read ends inside one.

:func:`scan_client_py` classifies what a client sent for the proxy's fast path (a read of whole,
ordinary messages is forwarded in one step; anything else goes through the proxy's own loop).

:func:`scan_server_py` and :func:`scan_client_py` are the references. ``pgreuse.wire._speedups`` has the
same two functions in C, used when it was built (``pip install`` compiles it where a C compiler is
present) unless the environment sets ``PGREUSE_PURE_PYTHON=1``; :data:`IMPLEMENTATION` says which
ones run. Each pair is compared on the same streams, cut at every byte, by ``tests/wire/test_scan.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .. import _cmodule
from .protocol import MAX_FRAME

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


# Client message types (as ints; the proxy's message loop uses them too): sync points (Query, Sync,
# FunctionCall: each gets exactly one ReadyForQuery), and messages that belong to an exchange already
# counted (COPY data, CopyDone, CopyFail, Flush): they neither start nor leave unfinished work of
# their own.
SYNC_POINTS = frozenset(b"QSF")
NEUTRAL = frozenset(b"dcfH")
_P, _X = ord("P"), ord("X")


def scan_client_py(data: bytes | bytearray | memoryview, n: int, session_mode: bool) -> tuple[int, int, int]:
    """Classify the first ``n`` bytes of ``data``, read from a client at a message boundary, for the
    proxy's fast path. Returns ``(syncs, unsynced, first)``:

    * ``syncs``: the sync points (Query, Sync, FunctionCall) among them;
    * ``unsynced``: 1 if a message other than a sync point, COPY data or Flush follows the last sync
      point, 0 if a sync point ends them (apart from such neutral messages), -1 if all are neutral;
    * ``first``: the first message's type byte;

    or ``(0, 0, -1)`` when the bytes are not for the fast path, and the proxy's message loop must
    take them one by one: they do not end at a message boundary, a length is out of range, or a
    message needs its own handling (Terminate; in transaction mode, a Parse naming its statement).
    """
    if n < 5:
        return 0, 0, -1
    pos = 0
    syncs = 0
    unsynced = -1
    unpack = _HEADER.unpack_from
    while pos < n:
        if n - pos < 5:
            return 0, 0, -1
        type_, length = unpack(data, pos)
        end = pos + 1 + length
        if length < 4 or length > MAX_FRAME or end > n or type_ == _X:
            return 0, 0, -1
        if type_ in SYNC_POINTS:
            syncs += 1
            unsynced = 0
        elif type_ not in NEUTRAL:
            if type_ == _P and not session_mode and length > 4 and data[pos + 5]:
                return 0, 0, -1
            unsynced = 1
        pos = end
    return syncs, unsynced, data[0]


ScanServer = Callable[[bytes | bytearray | memoryview, int, int], tuple[int, int, int, int]]
ScanClient = Callable[[bytes | bytearray | memoryview, int, bool], tuple[int, int, int]]
scan_server: ScanServer = scan_server_py
scan_client: ScanClient = scan_client_py
IMPLEMENTATION = "python"
# PGREUSE_PURE_PYTHON=1: the Python references run even where the C modules are built (the proxy
# session's C core and the slot words follow the same switch, pgreuse._cmodule).
PURE_PYTHON = _cmodule.PURE_PYTHON
_speedups = _cmodule.load("wire._speedups")
if _speedups is not None:
    scan_server = _speedups.scan_server
    scan_client = _speedups.scan_client
    IMPLEMENTATION = "c"
