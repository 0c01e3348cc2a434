"""The lease hooks the client calls on the lease path, and the providers they record to
(:func:`configure`).

The two share a module because the hooks read ``_providers`` once per lease: a global of their own
module is the cheapest look-up there is on that path.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import attrs
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from .telemetry_instruments import _Providers
from .telemetry_names import (
    BACKEND_PID,
    ERROR_TYPE,
    GENERATION,
    GRANTED_EVENT,
    LEASE_WAIT,
    OUTCOME,
    OUTCOME_BROKEN,
    OUTCOME_GRANTED,
    OUTCOME_PROXIED,
    RELEASE,
    SLOT,
    SPAN_NAME,
    _outcome,
)
from .telemetry_pools import PoolTelemetry

# -- the providers in use --------------------------------------------------------------------------

# (for_pool, in telemetry_reporter.py, registers pools under this lock too)
_lock = threading.Lock()
_providers: _Providers | None = None
# The instruments on the global providers are made once: the API's proxy meter keeps every instrument
# ever created on it, so configure() back to the globals must not add a second set.
_global: _Providers | None = None


def _get() -> _Providers:
    global _providers, _global  # noqa: PLW0603
    p = _providers
    if p is None:
        with _lock:
            if _providers is None:
                _global = _providers = _global or _Providers(None, None)
            p = _providers
    return p


def configure(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Use these providers instead of the global ones (``None``: the global provider).

    The global providers are what most applications want, and need no call here. Passing providers
    explicitly is for tests and for applications that keep pgreuse's telemetry apart.
    """
    global _providers  # noqa: PLW0603
    with _lock:
        if tracer_provider is None and meter_provider is None:
            _providers = None  # the global set, made (once) on next use
        else:
            _providers = _Providers(tracer_provider, meter_provider)


# -- the lease hooks (called by the client on the lease path) --------------------------------------


class LeaseInfo(Protocol):
    """What the hooks read of a :class:`pgreuse.Lease`."""

    @property
    def slot(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def backend_pid(self) -> int: ...
    @property
    def waited(self) -> float: ...  # seconds from the request to the grant
    @property
    def started(self) -> float: ...  # time.monotonic() at the grant


@attrs.define(eq=False)
class LeaseSpan:
    """The open span of one held lease (``None`` in its place when tracing is off)."""

    span: Span


def watched() -> bool:
    """Whether the lease hooks would record anything now. A connection asks once per lease and
    calls neither :func:`lease_granted` nor :func:`lease_released` when they would not."""
    return not (_providers or _get()).quiet()


def lease_granted(pool: PoolTelemetry | None, lease: LeaseInfo) -> LeaseSpan | None:
    """A lease was granted: record its wait, and open its span (backdated to the request)."""
    if pool is None:
        return None
    p = _providers or _get()
    if p.quiet():
        return None
    if p.metered:
        p.wait_time.record(lease.waited, pool.attributes)
    if not p.tracing():
        return None
    now = time.time_ns()
    span = p.tracer.start_span(
        SPAN_NAME, start_time=now - int(lease.waited * 1e9), attributes=pool.span_attributes
    )
    span.set_attributes(
        {
            SLOT: lease.slot,
            GENERATION: lease.generation,
            BACKEND_PID: lease.backend_pid,
            LEASE_WAIT: lease.waited,
            OUTCOME: OUTCOME_GRANTED,
        }
    )
    span.add_event(GRANTED_EVENT, timestamp=now)
    return LeaseSpan(span)


def lease_denied(pool: PoolTelemetry | None, exc: BaseException, waited: float) -> None:
    """No lease came after ``waited`` seconds: a span with the error (timeouts are counted in the
    table, which :data:`TIMEOUTS` reads)."""
    if pool is None:
        return
    p = _get()
    if not p.tracing():
        return
    now = time.time_ns()
    span = p.tracer.start_span(SPAN_NAME, start_time=now - int(waited * 1e9), attributes=pool.span_attributes)
    span.set_attributes(
        {
            OUTCOME: _outcome(exc),
            LEASE_WAIT: waited,
            ERROR_TYPE: f"{type(exc).__module__}.{type(exc).__qualname__}",
        }
    )
    span.record_exception(exc, timestamp=now)
    span.set_status(Status(StatusCode.ERROR, str(exc)))
    span.end(now)


def lease_released(
    pool: PoolTelemetry | None,
    lease: LeaseInfo,
    lease_span: LeaseSpan | None,
    *,
    broken: bool,
    dirty: bool,
) -> None:
    """The lease went back: record how long it was held, and close its span."""
    if pool is None:
        return
    p = _providers or _get()
    if p.metering():
        p.use_time.record(max(0.0, time.monotonic() - lease.started), pool.attributes)
    if lease_span is None:
        return
    span = lease_span.span
    span.set_attribute(RELEASE, "broken" if broken else ("dirty" if dirty else "clean"))
    if broken:
        span.set_attribute(OUTCOME, OUTCOME_BROKEN)
        span.set_attribute(ERROR_TYPE, OUTCOME_BROKEN)
        span.set_status(Status(StatusCode.ERROR, f"backend pid {lease.backend_pid} failed while leased"))
    span.end()


def proxied_started(pool: PoolTelemetry | None) -> LeaseSpan | None:
    """A transaction goes through the broker's proxy: open its span."""
    if pool is None:
        return None
    p = _get()
    if not p.tracing():
        return None
    span = p.tracer.start_span(SPAN_NAME, attributes=pool.span_attributes)
    span.set_attribute(OUTCOME, OUTCOME_PROXIED)
    return LeaseSpan(span)


def proxied_ended(
    pool: PoolTelemetry | None, lease_span: LeaseSpan | None, exc: BaseException | None
) -> None:
    """A proxied transaction is over (``exc``: the proxy refused it, e.g. PoolTimeout)."""
    if lease_span is None:
        return
    span = lease_span.span
    if exc is not None:
        now = time.time_ns()
        span.set_attributes(
            {OUTCOME: _outcome(exc), ERROR_TYPE: f"{type(exc).__module__}.{type(exc).__qualname__}"}
        )
        span.record_exception(exc, timestamp=now)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        span.end(now)
        return
    span.end()
