"""The names pgreuse's spans and metrics carry, and the outcome a refused lease's exception gives.

Written out, not imported (see :mod:`pgreuse.telemetry`), and kept apart from the code that records
them so that every part of the telemetry takes them from one place; :mod:`pgreuse.telemetry`
re-exports them.
"""

from __future__ import annotations

from . import errors

# -- names (OpenTelemetry database semantic conventions, connection pools) -------------------------

CONNECTION_COUNT = "db.client.connection.count"
CONNECTION_MAX = "db.client.connection.max"
CONNECTION_IDLE_MIN = "db.client.connection.idle.min"
PENDING_REQUESTS = "db.client.connection.pending_requests"
TIMEOUTS = "db.client.connection.timeouts"
CREATE_TIME = "db.client.connection.create_time"
WAIT_TIME = "db.client.connection.wait_time"
USE_TIME = "db.client.connection.use_time"

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
STATE_IDLE = "idle"
STATE_USED = "used"
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
ERROR_TYPE = "error.type"

# pgreuse's own span attributes.
SPAN_NAME = "pgreuse.lease"
GRANTED_EVENT = "pgreuse.lease.granted"
SLOT = "pgreuse.lease.slot"
GENERATION = "pgreuse.lease.generation"
BACKEND_PID = "pgreuse.lease.backend_pid"
OUTCOME = "pgreuse.lease.outcome"
LEASE_WAIT = "pgreuse.lease.wait_time"
RELEASE = "pgreuse.lease.release"  # how the backend went back: clean, dirty (reset first), broken

OUTCOME_GRANTED = "granted"
OUTCOME_PROXIED = "proxied"  # no backend was idle (or the proxy had waiters): through the broker
OUTCOME_TIMEOUT = "timeout"
OUTCOME_BROKEN = "broken"  # granted, then the backend failed while held
OUTCOME_UNAVAILABLE = "unavailable"  # PostgreSQL unreachable, or the broker gone
OUTCOME_CLOSED = "closed"  # the broker is shutting down
OUTCOME_ERROR = "error"  # anything else (too many waiters, interrupted, protocol error)

SCOPE = "pgreuse"


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, errors.PoolTimeout):
        return OUTCOME_TIMEOUT
    if isinstance(exc, errors.BackendUnavailable | errors.BrokerUnavailable):
        return OUTCOME_UNAVAILABLE
    if isinstance(exc, errors.PoolClosed):
        return OUTCOME_CLOSED
    return OUTCOME_ERROR
