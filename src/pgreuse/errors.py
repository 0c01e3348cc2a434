"""The whole pgreuse error tree.

Every error a user can see subclasses a psycopg error class, so that code written against psycopg (and
``except psycopg.OperationalError`` in frameworks) keeps catching them. Pool errors keep psycopg_pool's
names. Messages say what happened, which value caused it, and what to do.
"""

from __future__ import annotations

import psycopg
import psycopg_pool

# The pool errors subclass psycopg_pool's (themselves psycopg.OperationalError), so an application
# that moved from psycopg_pool to pgreuse keeps catching them with the same except clauses.


class PoolTimeout(psycopg_pool.PoolTimeout):
    """No backend could be leased within the broker's wait timeout."""


class TooManyRequests(psycopg_pool.TooManyRequests):
    """Too many requests are already waiting for a backend."""


class PoolClosed(psycopg_pool.PoolClosed):
    """The broker is shutting down and lends no more backends."""


class BrokerUnavailable(psycopg.OperationalError):
    """No broker answers at the socket path the connection names, or it went away."""


class BackendUnavailable(psycopg.OperationalError):
    """The broker cannot open a backend: PostgreSQL is down or refuses the broker's connections."""


class NotSupported(psycopg.NotSupportedError):
    """A psycopg feature or setting that cannot work when backends are shared per transaction."""


class WrongProcess(psycopg.ProgrammingError):
    """A pgreuse connection was used in a process other than the one that opened it (e.g. after fork)."""


class ProtocolMismatch(psycopg.InterfaceError):
    """The broker and this client speak different control-protocol versions."""


__all__ = [
    "BackendUnavailable",
    "BrokerUnavailable",
    "NotSupported",
    "PoolClosed",
    "PoolTimeout",
    "ProtocolMismatch",
    "TooManyRequests",
    "WrongProcess",
]


# What the broker's proxy answers a transaction it could not serve (pgreuse.broker.proxy), by
# SQLSTATE and the start of the message: pgreuse connections raise the pool error it names.
_PROXY_REFUSALS: tuple[tuple[str, str, type[psycopg.OperationalError]], ...] = (
    ("08P01", "query_wait_timeout: pgreuse broker: ", PoolTimeout),
    ("53300", "pgreuse broker: ", TooManyRequests),
    ("08006", "pgreuse broker: ", BackendUnavailable),
    ("57P01", "pgreuse broker: ", PoolClosed),
)


_SHUTTING_DOWN = "pgreuse broker: the broker is shutting down"


def wait_timeout_message(timeout: float, max_size: int) -> str:
    """What a transaction that waited ``timeout`` seconds for a backend is told (the broker's proxy
    and the table's queue say the same)."""
    return f"no backend free within {timeout:g}s (--wait-timeout; all {max_size} of --max-size are in use)"


def from_proxy_refusal(exc: psycopg.Error) -> psycopg.OperationalError | None:
    """The pool error for the broker proxy's refusal ``exc``, or ``None`` if it is not one."""
    if exc.sqlstate is None and _SHUTTING_DOWN in str(exc):
        # A FATAL that closes the connection reaches some libpq versions (psycopg 3.2's) as a lost
        # connection with the server's message in its text, and no SQLSTATE.
        return PoolClosed(_SHUTTING_DOWN.removeprefix("pgreuse broker: "))
    message = exc.diag.message_primary or ""
    for sqlstate, prefix, kind in _PROXY_REFUSALS:
        if exc.sqlstate == sqlstate and message.startswith(prefix):
            return kind(message[len(prefix) :])  # the message a handed-off wait gave
    return None
