"""The broker's state as its parts see it: what :class:`~.server.Broker` holds, and the methods
one part calls in another, declared once for the type checker.

The broker is one object made of mixins, one per job (:mod:`.lifecycle`, :mod:`.pg_listener`,
:mod:`.parking`, :mod:`.control_listener`); :class:`~.server.Broker` sets every field in its
``__init__``. Declares nothing at run time.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    import socket

    from ..shm import Table
    from ..wire import frames
    from .access import Access, Peer
    from .backend_target import BackendTarget
    from .config import BrokerConfig
    from .greeting import Greeting, ParkingSecrets
    from .hangups import HangupWatch
    from .login import Admission
    from .parking import Parking
    from .password_login import PasswordLogin
    from .pool import Pool
    from .proxy import PyProxySession, PyProxyStats
    from .settings_file import SettingsSource


class BrokerFields:
    """The broker's state and the methods its parts call across modules (for the type checker)."""

    if TYPE_CHECKING:
        config: BrokerConfig
        source: SettingsSource | None
        _parent: tuple[int, int] | None
        target: BackendTarget
        access: Access
        passwords: PasswordLogin | None
        os_user: str | None
        admission: Admission
        parkings: dict[int, Parking]
        _next_key: int
        greeting: Greeting
        parking_secrets: ParkingSecrets
        _stop: asyncio.Event
        _listeners: list[socket.socket]
        _tasks: set[asyncio.Task[None]]
        table: Table | None
        pool: Pool | None
        hangups: HangupWatch | None
        sessions: dict[int, PyProxySession]
        admin_sessions: int
        proxy_stats: PyProxyStats
        _holders: set[int]
        _next_holder: int

        def stop(self) -> None: ...
        def _spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...
        def _allowed(self, sock: socket.socket, what: str) -> tuple[Peer | None, str]: ...
        def _cancel(self, key: int, secret: int) -> None: ...
        async def _startup(
            self, packet: frames.StartupMessage, peer_pid: int, authenticated: bool = False
        ) -> tuple[bytes, Parking]: ...
        async def _serve_pg(self, sock: socket.socket, tcp: bool = False) -> None: ...
        async def _serve_pg_tcp(self, sock: socket.socket) -> None: ...
        async def _serve_control(self, sock: socket.socket) -> None: ...
