"""OpenTelemetry spans and metrics for pgreuse, through ``opentelemetry-api`` only.

Without an SDK every call here is a no-op costing well under a microsecond on the lease path: no span
is started while the global tracer provider is the API's placeholder. With an SDK (set up in each
worker after fork, see docs/observability.md):

Spans
    One span ``pgreuse.lease`` per transaction. A claimed backend's span runs from the claim until
    the backend is given back, with an event ``pgreuse.lease.granted`` at the claim; a transaction
    that went through the broker's proxy has outcome ``proxied`` and runs until it is over (its wait
    in the proxy is inside it: the broker's table counts it in the pool's wait histogram). It is
    started with the application's current span as parent (a Django/Flask request span, or the
    statement span of ``opentelemetry-instrumentation-psycopg``), and never made current itself: a
    lease outlives the ``wait()`` call that took it, and a context attached in one call and detached in
    another breaks the context stack. A lease that is never granted (timeout, PostgreSQL unreachable,
    broker gone) still gets its span, with status ERROR and the exception recorded.

Metrics (the database semantic conventions for connection pools, names written out below)
    ``db.client.connection.wait_time`` and ``.use_time`` are histograms recorded by each process for
    its own leases, so summing them over processes is right. The pool-wide values (``.count`` by
    ``db.client.connection.state``, ``.max``, ``.idle.min``, ``.pending_requests``, ``.timeouts``,
    ``.create_time``) are read from the broker's shared-memory table when the SDK collects, and
    reported by exactly one process per pool at a time (the holder of a ``flock`` on the table file;
    the kernel releases it when that process dies and the next collection of another process takes
    over). So a dashboard may sum over processes without counting the pool once per worker.

Attribute names are written out (in :mod:`.telemetry_names`) rather than imported from
``opentelemetry-semantic-conventions``, which pins the API version.

This module is the one to import; its parts live next to it: :mod:`.telemetry_names` (the names),
:mod:`.telemetry_hooks` (the lease hooks, and :func:`configure`), :mod:`.telemetry_instruments` (the
tracer, the instruments and their callbacks), :mod:`.telemetry_pools` (the pools this process reports
on) and :mod:`.telemetry_reporter` (a pool's registration, and the reporter election).
"""

from __future__ import annotations

from .telemetry_hooks import (
    LeaseInfo,
    LeaseSpan,
    _get,  # noqa: F401 - tests ask it
    configure,
    lease_denied,
    lease_granted,
    lease_released,
    proxied_ended,
    proxied_started,
    watched,
)
from .telemetry_instruments import QUIET_CALLS
from .telemetry_names import (
    BACKEND_PID,
    CONNECTION_COUNT,
    CONNECTION_IDLE_MIN,
    CONNECTION_MAX,
    CREATE_TIME,
    DB_NAMESPACE,
    DB_SYSTEM_NAME,
    ERROR_TYPE,
    GENERATION,
    GRANTED_EVENT,
    LEASE_WAIT,
    OUTCOME,
    OUTCOME_BROKEN,
    OUTCOME_CLOSED,
    OUTCOME_ERROR,
    OUTCOME_GRANTED,
    OUTCOME_PROXIED,
    OUTCOME_TIMEOUT,
    OUTCOME_UNAVAILABLE,
    PENDING_REQUESTS,
    POOL_NAME,
    RELEASE,
    SCOPE,
    SLOT,
    SPAN_NAME,
    STATE,
    STATE_IDLE,
    STATE_USED,
    TIMEOUTS,
    USE_TIME,
    WAIT_TIME,
)
from .telemetry_pools import PoolTelemetry, registered_pools
from .telemetry_reporter import (
    _TableReader,  # noqa: F401 - tests make one
    for_control_socket,
    for_pool,
)

__all__ = [
    "BACKEND_PID",
    "CONNECTION_COUNT",
    "CONNECTION_IDLE_MIN",
    "CONNECTION_MAX",
    "CREATE_TIME",
    "DB_NAMESPACE",
    "DB_SYSTEM_NAME",
    "ERROR_TYPE",
    "GENERATION",
    "GRANTED_EVENT",
    "LEASE_WAIT",
    "OUTCOME",
    "OUTCOME_BROKEN",
    "OUTCOME_CLOSED",
    "OUTCOME_ERROR",
    "OUTCOME_GRANTED",
    "OUTCOME_PROXIED",
    "OUTCOME_TIMEOUT",
    "OUTCOME_UNAVAILABLE",
    "PENDING_REQUESTS",
    "POOL_NAME",
    "QUIET_CALLS",
    "RELEASE",
    "SCOPE",
    "SLOT",
    "SPAN_NAME",
    "STATE",
    "STATE_IDLE",
    "STATE_USED",
    "TIMEOUTS",
    "USE_TIME",
    "WAIT_TIME",
    "LeaseInfo",
    "LeaseSpan",
    "PoolTelemetry",
    "configure",
    "for_control_socket",
    "for_pool",
    "lease_denied",
    "lease_granted",
    "lease_released",
    "proxied_ended",
    "proxied_started",
    "registered_pools",
    "watched",
]
