"""pgreuse: every forked worker shares one small, bounded set of PostgreSQL connections.

A broker (``python -m pgreuse.broker``, or started by the Gunicorn master) owns the backends; a
:class:`Connection` leases one for each transaction and talks to PostgreSQL directly.
"""

from .client import Connection, Lease, connect
from .errors import (
    BackendUnavailable,
    BrokerUnavailable,
    LeaseRevoked,
    NotSupported,
    PoolClosed,
    PoolTimeout,
    ProtocolMismatch,
    TooManyRequests,
    WrongProcess,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "BrokerUnavailable",
    "Connection",
    "Lease",
    "LeaseRevoked",
    "NotSupported",
    "PoolClosed",
    "PoolTimeout",
    "ProtocolMismatch",
    "TooManyRequests",
    "WrongProcess",
    "__version__",
    "connect",
]
