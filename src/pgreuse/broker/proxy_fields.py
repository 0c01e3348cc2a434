"""What the parts of a proxy session share: its fields (declared for the type checker), the
constants of its wire handling, the per-message decision, and the totals every session adds to.

:class:`~.proxy_session.PyProxySession` sets every field in its ``__init__``; its parts are mixins,
one module each: :mod:`.proxy_client` (client -> backend), :mod:`.proxy_lease` (the lease) and
:mod:`.proxy_backend` (backend -> client). Declares nothing at run time but the constants: the C
core (``_proxycore``) holds the hot fields as struct members of a base type.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    import asyncio
    import itertools
    import socket
    from collections.abc import Callable

    from ..wire import control
    from .backends import Backend
    from .pool import Pool
    from .tls import TLSStream

_RECV = 256 * 1024
# Every plaintext read lands here and is copied out at its real size: recv(_RECV) would allocate
# _RECV bytes each time, which glibc serves with mmap/munmap above its threshold (two extra
# syscalls and page faults per read). One buffer serves all sessions: the loop runs one at a time.
_RBUF = memoryview(bytearray(_RECV))
# Bytes a client may send while it waits for a backend before the broker stops reading from it.
_MAX_PENDING = 1024 * 1024
_HEADER = struct.Struct("!ci")
_IDLE = ord("I")  # ReadyForQuery status: not in a transaction


@attrs.define
class PyProxyStats:
    """Totals over every proxy session of a broker (``SHOW STATS``); with the C core,
    ``pgreuse.broker._proxycore.ProxyCounters`` holds the same fields (see :data:`ProxyStats`)."""

    xacts: int = 0  # leases given back (transactions in transaction mode)
    queries: int = 0  # sync points forwarded
    received: int = 0  # bytes from clients
    sent: int = 0  # bytes to clients
    wait_ns: int = 0
    denied: int = 0
    broken: int = 0  # backends given back BROKEN


class _Forward:
    """Per-message decision while scanning a client chunk."""

    FORWARD: Final = 0
    DROP: Final = 1
    REJECT: Final = 2  # after a denied lease: answer like a server in error, until Sync


class SessionFields:
    """A proxy session's state and the methods its parts call across modules (for the type checker)."""

    if TYPE_CHECKING:
        _ids: itertools.count[int]
        in_process: bool
        loop: asyncio.AbstractEventLoop
        sock: socket.socket
        fd: int
        pool: Pool
        parking_key: int
        pid: int
        fds: dict[int, int]
        session_mode: bool
        stats: PyProxyStats
        user: str
        database: str
        application_name: str
        addr: str
        connect_time: float
        done: asyncio.Future[None]
        proxied: bool
        closed: bool
        backend: Backend | None
        _bsock: socket.socket | TLSStream | None
        _btls: TLSStream | None
        _bfd: int
        _request: int | None
        _request_ns: int
        _want_lease: bool
        _denying: bool
        _lease_deferred: bool
        _to_backend: bytearray
        _c_left: int
        _c_action: int
        _c_stash: bytes
        _rejecting: bytes | None
        _syncs: int
        _unsynced: bool
        _quitting: bool
        _to_client: bytearray
        _b_left: int
        _b_stash: bytes
        _tx: int
        _dirty: bool
        _c_reading: bool
        _c_writing: bool
        _b_writing: bool
        _on_backend: Callable[[], None]

        @property
        def state(self) -> str: ...
        def close(self, error: bytes = b"") -> None: ...
        def _outcome_on_leave(self) -> control.Outcome: ...
        def _idle(self) -> bool: ...
        def _interest(self) -> None: ...
        def _set_client(self, *, reading: bool, writing: bool) -> None: ...
        def _set_backend(self, *, reading: bool, writing: bool) -> None: ...
        # client -> backend (proxy_client.py)
        def _client_readable(self) -> None: ...
        def _from_client(self, data: bytes) -> None: ...
        def _forward(self, chunk: bytes | memoryview) -> None: ...
        def _backend_writable(self) -> None: ...
        def _flush_to_backend(self) -> None: ...
        # the lease (proxy_lease.py)
        def _lease(self) -> None: ...
        def _give_back(self, outcome: control.Outcome, *, just_read: bool = False) -> None: ...
        def _backend_failed(self, why: str) -> None: ...
        # backend -> client (proxy_backend.py)
        def _backend_readable(self) -> None: ...
        def _reply(self, data: bytes | memoryview) -> None: ...
        def _client_writable(self) -> None: ...
