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

Attribute names are written out here rather than imported from ``opentelemetry-semantic-conventions``,
which pins the API version.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Span, Status, StatusCode, Tracer

from . import errors
from .shm import Table, TableError, table_path
from .snapshot import WAIT_BUCKETS, Snapshot
from .wire.states import SlotState

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


# -- pools and the reporter election ---------------------------------------------------------------


@attrs.define(eq=False)
class PoolTelemetry:
    """What a connection needs to report its leases, shared by every connection to one pool.

    ``name`` follows the conventions' fallback for pools without a name of their own:
    ``<address>:<port>/<database>``, here ``<socket dir>:<port>/<dbname>``.
    """

    name: str
    database: str
    table_path: str
    attributes: dict[str, str]  # on every metric point: the pool name
    span_attributes: dict[str, str | int]
    reader: _TableReader


_pools: dict[tuple[str, int, str], PoolTelemetry] = {}


def for_control_socket(path: str, database: str) -> PoolTelemetry:
    """:func:`for_pool` from the control socket's path (``<socket dir>/.s.PGREUSE.<port>``)."""
    socket_dir, _, name = path.rpartition("/")
    return for_pool(socket_dir, int(name.rpartition(".")[2]), database)


def for_pool(socket_dir: str, port: int, database: str) -> PoolTelemetry:
    """The telemetry of the pool behind ``socket_dir``/``port`` (registered on first use)."""
    key = (socket_dir, port, database)
    pool = _pools.get(key)
    if pool is None:
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                name = f"{socket_dir}:{port}/{database}"
                path = table_path(socket_dir, port)
                attributes = {POOL_NAME: name}
                pool = PoolTelemetry(
                    name=name,
                    database=database,
                    table_path=path,
                    attributes=attributes,
                    span_attributes={POOL_NAME: name, DB_SYSTEM_NAME: "postgresql", DB_NAMESPACE: database},
                    reader=_TableReader(path, attributes),
                )
                _pools[key] = pool
            # The first process to connect reports from now on (its create_time baseline is now).
            pool.reader.elect()
        _get()  # the instruments, and their callbacks, exist once a pool does
    return pool


class _TableReader:
    """This process's read-only view of one table, and whether it is the pool's reporter."""

    def __init__(self, path: str, attributes: dict[str, str]) -> None:
        self.path = path
        self.attributes = attributes
        self.table: Table | None = None
        self.lock_fd = -1
        self.reporter = False
        self.seen_opened = 0  # backends_opened / connect_ns when create_time was last sampled
        self.seen_connect_ns = 0
        self.mutex = threading.Lock()

    def _drop(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock (no other fd of this process shares it)
            self.lock_fd = -1
        self.reporter = False

    def forget_after_fork(self) -> None:
        # The child shares the parent's open file description, hence its flock: it must not report
        # too. Closing its copy of the fd leaves the parent's lock in place.
        with contextlib.suppress(OSError):
            if self.lock_fd >= 0:
                os.close(self.lock_fd)
        self.lock_fd = -1
        self.reporter = False
        self.mutex = threading.Lock()

    def elect(self) -> bool:
        """Map the table if needed and try to become the reporter; True if this process reports."""
        with self.mutex:
            return self._elect()

    def _elect(self) -> bool:
        if self.table is not None:
            try:
                same = os.stat(self.path).st_ino == self.table.inode
            except OSError:
                same = False
            if not same:
                self._drop()  # the broker restarted (new table) or stopped: its lock is void too
        if self.table is None:
            try:
                self.table = Table.open(self.path)
            except (OSError, TableError):
                return False  # no broker now: report nothing rather than stale numbers
        if self.reporter:
            return True
        try:
            if self.lock_fd < 0:
                self.lock_fd = os.open(self.path, os.O_RDONLY)  # non-inheritable: not passed on exec
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another process reports this pool
        self.reporter = True
        snap = self.table.snapshot()
        self.seen_opened = snap.counters["backends_opened"]
        self.seen_connect_ns = snap.counters["connect_ns"]
        return True

    def read(self) -> Snapshot | None:
        """The table now if this process is the pool's reporter, else ``None``."""
        with self.mutex:
            if not self._elect():
                return None
            assert self.table is not None
            snap = self.table.snapshot()
            self._sample_create_time(snap)
            return snap

    def _sample_create_time(self, snap: Snapshot) -> None:
        # The table keeps only the total connect time and the number of backends opened; each new
        # backend since the last sample is recorded at the mean of the new connect time.
        opened, connect_ns = snap.counters["backends_opened"], snap.counters["connect_ns"]
        n = opened - self.seen_opened
        if n > 0 and connect_ns >= self.seen_connect_ns:
            mean = (connect_ns - self.seen_connect_ns) / n / 1e9
            hist = _get().create_time
            for _ in range(n):
                hist.record(mean, self.attributes)
        self.seen_opened, self.seen_connect_ns = opened, connect_ns


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


def _after_fork_in_child() -> None:
    for pool in _pools.values():
        pool.reader.forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


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


def registered_pools() -> Sequence[PoolTelemetry]:
    """The pools this process reports on (for tests and diagnostics)."""
    return list(_pools.values())
