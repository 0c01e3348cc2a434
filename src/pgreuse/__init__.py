"""pgreuse: every forked worker shares one small, bounded set of PostgreSQL connections.

A broker (``python -m pgreuse.broker``, or started by the Gunicorn master) owns the backends; a
:class:`Connection` leases one for each transaction and talks to PostgreSQL directly.
"""

from .client import AsyncConnection, Connection, Lease, connect, connect_async
from .errors import (
    BackendUnavailable,
    BrokerUnavailable,
    NotSupported,
    PoolClosed,
    PoolTimeout,
    ProtocolMismatch,
    TooManyRequests,
    WrongProcess,
)
from .pool import AsyncConnectionPool, ConnectionPool

__version__ = "0.1.0"

__all__ = [
    "AsyncConnection",
    "AsyncConnectionPool",
    "BackendUnavailable",
    "BrokerUnavailable",
    "Connection",
    "ConnectionPool",
    "Lease",
    "NotSupported",
    "PoolClosed",
    "PoolTimeout",
    "ProtocolMismatch",
    "TooManyRequests",
    "WrongProcess",
    "__version__",
    "connect",
    "connect_async",
]
