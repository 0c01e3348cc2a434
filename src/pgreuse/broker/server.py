"""The broker process: its two listeners, the clients on them, and its lifecycle.

* ``<socket-dir>/.s.PGSQL.<port>`` speaks the PostgreSQL protocol. A pgreuse connection's libpq does its
  startup here and then *parks*: the broker answers with the parameters of a real backend and a parking
  key, and the socket stays quiet until the connection closes. Any other client (psql, pgbench) sends
  queries on it instead, and the broker proxies them to leased backends (:mod:`.proxy`). The
  database ``pgreuse`` is the admin console (:mod:`.admin`). CancelRequests arrive here too and are
  forwarded to the backend currently leased by the connection that owns the key. The same protocol is
  served on ``--listen-addr`` (TCP) when it is set: loopback only, or any address with ``--auth-file``,
  whose users log in with SCRAM-SHA-256 (:mod:`.password_login`).
* ``<socket-dir>/.s.PGREUSE.<port>`` (``SOCK_SEQPACKET``) carries lease messages, one channel per worker
  process, and the backend fds (``SCM_RIGHTS``).

Malformed input closes that client with a log line; it never takes the broker or a backend down.

:class:`Broker` holds the broker's state; its jobs are mixins, one module each: :mod:`.lifecycle`
(start, signals, reload, shutdown), :mod:`.pg_listener` (a PostgreSQL client from accept to its
end), :mod:`.parking` (its startup checked against the pool, and cancel requests), and
:mod:`.control_listener` (the workers' channels).
"""

from __future__ import annotations

import asyncio
import socket

from .. import slots
from ..shm import Table
from .access import Access
from .backend_target import BackendTarget, parse_target
from .config import BrokerConfig, ConfigError
from .control_client import ControlClient
from .control_listener import ControlListener
from .greeting import Greeting, ParkingSecrets
from .hangups import HangupWatch
from .lifecycle import Lifecycle
from .login import Admission, own_user
from .login_rules import read_login_rules
from .parking import PARKING_KEY_BASE, Parking, Parkings
from .password_login import PasswordLogin
from .pg_listener import PgListener
from .pool import Pool
from .proxy import ProxyStats, PyProxySession
from .settings_file import SettingsSource
from .upkeep import CHECKED_PARAMETERS


class Broker(Lifecycle, PgListener, Parkings, ControlListener):
    """The broker process (see the module docstring): its state, and its jobs as mixins."""

    def __init__(self, config: BrokerConfig, source: SettingsSource | None = None) -> None:
        self.config = config
        self.source = source  # where a reload reads the settings again (None: nowhere)
        self._parent: tuple[int, int] | None = None  # (pid, pidfd) watched: we exit with it
        try:
            self.target: BackendTarget = parse_target(config.dsn)
        except ValueError as exc:
            raise ConfigError(f"--dsn: {exc}") from exc
        self.access: Access
        self.passwords: PasswordLogin | None
        self.access, self.passwords = read_login_rules(config)  # (a reload reads them again)
        # Looked up once (a lookup per startup may fail at the open-files limit).
        self.os_user = own_user()
        self.admission = Admission(config.max_client_conn)
        self.parkings: dict[int, Parking] = {}
        self._next_key = PARKING_KEY_BASE
        self.greeting = Greeting()
        self.parking_secrets = ParkingSecrets()
        self._stop = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.table: Table | None = None
        self.pool: Pool | None = None
        self.hangups: HangupWatch | None = None
        self.sessions: dict[int, PyProxySession] = {}  # parking key -> session (parked or proxied)
        self.admin_sessions = 0
        self.proxy_stats = ProxyStats()
        self._holders: set[int] = set()  # holder ids of the open control channels
        self._next_holder = slots.FIRST_WORKER


# Checked parameters are exported so tests can assert the replay covers them.
__all__ = ["CHECKED_PARAMETERS", "Broker", "ControlClient"]
