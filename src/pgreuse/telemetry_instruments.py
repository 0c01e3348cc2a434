"""The tracer and the metrics instruments in use (:class:`_Providers`), whether anything listens
to them, and the callbacks through which the pool-wide instruments read the registered pools'
tables when the SDK collects.

Apart from the lease hooks (:mod:`.telemetry_hooks`), which record to them and hold the ones in
use, and from the pools' registration (:mod:`.telemetry_reporter`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Tracer

from .snapshot import WAIT_BUCKETS, Snapshot
from .telemetry_names import (
    CONNECTION_COUNT,
    CONNECTION_IDLE_MIN,
    CONNECTION_MAX,
    CREATE_TIME,
    PENDING_REQUESTS,
    SCOPE,
    STATE,
    STATE_IDLE,
    STATE_USED,
    TIMEOUTS,
    USE_TIME,
    WAIT_TIME,
)
from .telemetry_pools import PoolTelemetry, _pools
from .wire.states import SlotState

# -- providers ----------------------------------------------------------------------------------------


# quiet() reads the clock every this many calls (a lease costs ~100 µs: ~6 ms between looks at most).
QUIET_CALLS = 64


class _Providers:
    """The tracer and instruments in use; rebuilt by :func:`configure`."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self.traced = tracer_provider is not None
        self.metered = meter_provider is not None
        self.recheck_at = 0.0
        self.quiet_calls = 0
        self.tracer: Tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(SCOPE)
        meter: Meter = (meter_provider or metrics.get_meter_provider()).get_meter(SCOPE)
        self.wait_time = _histogram(
            meter, WAIT_TIME, "The time it took to obtain an open connection from the pool"
        )
        self.use_time = _histogram(
            meter, USE_TIME, "The time between borrowing a connection and returning it to the pool"
        )
        self.create_time = _histogram(meter, CREATE_TIME, "The time it took to create a new connection")
        # The API's proxy meter keeps these callbacks and moves them to the real meter when an SDK is
        # installed later, so registering before the application's set-up loses nothing.
        meter.create_observable_up_down_counter(
            CONNECTION_COUNT, [_observe_count], "{connection}",
            "The number of connections that are currently in state described by the state attribute",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECTION_MAX, [_observe(lambda s: s.max_size)], "{connection}",
            "The maximum number of open connections allowed",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            CONNECTION_IDLE_MIN, [_observe(lambda s: s.min_size)], "{connection}",
            "The minimum number of idle open connections allowed",
        )  # fmt: skip
        meter.create_observable_up_down_counter(
            PENDING_REQUESTS, [_observe(lambda s: s.counters["pending"])], "{request}",
            "The number of current pending requests for an open connection",
        )  # fmt: skip
        meter.create_observable_counter(
            TIMEOUTS, [_observe(lambda s: s.counters["timeouts"])], "{timeout}",
            "The number of connection timeouts that have occurred trying to obtain a connection "
            "from the pool",
        )  # fmt: skip

    def tracing(self) -> bool:
        """False while the global tracer provider is the API's placeholder (no SDK installed).

        The placeholder would hand out non-recording spans anyway; not making them saves most of the
        hooks' cost. Asking the API costs over a microsecond (it reads ``os.environ``), so a "no" is
        kept for a second; a "yes" is kept for good, since a global provider cannot be unset.
        """
        if not self.traced:
            self._recheck()
        return self.traced

    def metering(self) -> bool:
        """False while the global meter provider is the API's placeholder: a histogram record then
        goes nowhere, and costs a microsecond per lease for nothing. Kept as :meth:`tracing` is
        (a record made in the second after an SDK is installed may be lost)."""
        if not self.metered:
            self._recheck()
        return self.metered

    def quiet(self) -> bool:
        """Neither traces nor the lease histograms go anywhere (the usual case without an SDK).

        Asked once per lease: without an SDK the clock is read only every :data:`QUIET_CALLS`th
        time (the API is asked at most once a second, as by :meth:`tracing`).
        """
        if self.traced or self.metered:
            return False
        self.quiet_calls -= 1
        if self.quiet_calls > 0:
            return True
        self.quiet_calls = QUIET_CALLS
        self._recheck()
        return not (self.traced or self.metered)

    def _recheck(self) -> None:
        now = time.monotonic()
        if now < self.recheck_at:
            return
        self.recheck_at = now + 1.0
        if not self.traced:
            self.traced = not isinstance(trace.get_tracer_provider(), _TRACE_PLACEHOLDERS)
        if not self.metered:
            # The API's own providers (the proxy, the no-op) live in the API package; an SDK's do not.
            provider = metrics.get_meter_provider()
            self.metered = not type(provider).__module__.startswith("opentelemetry.metrics")


_TRACE_PLACEHOLDERS = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def _histogram(meter: Meter, name: str, description: str) -> metrics.Histogram:
    # The SDK's default buckets (0..10000) suit milliseconds; these are seconds, so advise the table's
    # own wait buckets (100 us .. 10 s). The advisory argument needs opentelemetry-api >= 1.23.
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=WAIT_BUCKETS
        )
    except TypeError:
        return meter.create_histogram(name, unit="s", description=description)


def _reporting() -> Iterable[tuple[PoolTelemetry, Snapshot]]:
    # Several connections (dbnames) may share one table; each table is read once per callback.
    seen: set[int] = set()
    for pool in list(_pools.values()):
        if id(pool.reader) in seen:
            continue
        seen.add(id(pool.reader))
        snap = pool.reader.read()
        if snap is not None:
            yield pool, snap


def _observe_count(_options: CallbackOptions) -> Iterable[Observation]:
    out = []
    for pool, snap in _reporting():
        # A backend being reset after a lease is not available: it counts as used until it is idle.
        used = snap.count(SlotState.LENT) + snap.count(SlotState.RESETTING)
        out.append(Observation(snap.count(SlotState.IDLE), {**pool.attributes, STATE: STATE_IDLE}))
        out.append(Observation(used, {**pool.attributes, STATE: STATE_USED}))
    return out


def _observe(value: Callable[[Snapshot], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value(snap), pool.attributes) for pool, snap in _reporting()]

    return callback
