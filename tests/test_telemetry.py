"""OpenTelemetry: lease spans and pool metrics, seen through the SDK's in-memory exporter and reader,
after a known sequence of leases, a wait and a timeout against a real broker and PostgreSQL."""

# ruff: noqa: F811 - the broker fixtures are imported here, and test arguments name them

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import pgreuse
from broker_process import make_broker  # noqa: F401 - fixtures
from pgreuse import telemetry as t
from pgreuse.shm import table_path
from pgreuse.wire.states import SlotState


class Otel:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("app")

    def metrics(self) -> dict[str, tuple[str, list[tuple[dict[str, Any], Any]]]]:
        """name -> (unit, [(attributes, point)]) for pgreuse's scope."""
        out: dict[str, tuple[str, list[tuple[dict[str, Any], Any]]]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                if sm.scope.name != t.SCOPE:
                    continue
                for m in sm.metrics:
                    out[m.name] = (m.unit, [(dict(p.attributes), p) for p in m.data.data_points])
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    o = Otel()
    t.configure(tracer_provider=o.tracer_provider, meter_provider=o.meter_provider)
    try:
        yield o
    finally:
        t.configure()  # back to the global (no-op) providers
        o.meter_provider.shutdown()
        o.tracer_provider.shutdown()


def _value(metrics: dict[str, Any], name: str, pool: str, **attrs: str) -> Any:
    want = {t.POOL_NAME: pool, **{k.replace("_", "."): v for k, v in attrs.items()}}
    points = [p for a, p in metrics[name][1] if a == want]
    assert len(points) == 1, f"{name} {want}: {metrics[name][1]}"
    return points[0]


def test_spans_and_metrics_after_leases_a_wait_and_a_timeout(make_broker, otel):
    b = make_broker("--max-size", "1", "--wait-timeout", "0.3")
    pool = f"{b.socket_dir}:{b.port}/{b.dbname}"
    with b.connect() as a, b.connect() as other:
        # 1. A plain transaction inside an application span.
        with otel.tracer.start_as_current_span("request") as request, a.transaction():
            (pid,) = a.execute("select pg_backend_pid()").fetchone()
            assert a.lease is not None
            slot = a.lease.slot
            used = otel.metrics()
            assert _value(used, t.CONNECTION_COUNT, pool, db_client_connection_state="used").value == 1
            assert _value(used, t.CONNECTION_COUNT, pool, db_client_connection_state="idle").value == 0

        # 2. A wait: `other` queues while `a` holds the only backend, and gets it on commit.
        waited: list[float] = []
        a.execute("select 1")  # a transaction is open now: the lease stays
        worker = threading.Thread(target=lambda: waited.append(_timed(other)))
        worker.start()
        b.wait_for(lambda s: s.counters["pending"] == 1, what="a queued request")
        assert _value(otel.metrics(), t.PENDING_REQUESTS, pool).value == 1
        time.sleep(0.1)
        a.commit()
        worker.join(10)
        assert waited and waited[0] >= 0.1

        # 3. A timeout: `other` gives up after the broker's --wait-timeout of 0.3s.
        b.settle()  # (the proxy gave the backend back: `a` claims it again once it is shared)
        a.execute("select 1")
        with pytest.raises(pgreuse.PoolTimeout):
            other.execute("select 1")
        a.commit()
    b.wait_for(lambda s: s.count(SlotState.IDLE) == 1, what="the backend back in the pool")

    spans = otel.spans.get_finished_spans()
    leases = [s for s in spans if s.name == t.SPAN_NAME]
    assert len(leases) == 5  # the request, the transaction before the wait, the waiter, the
    # transaction before the timeout, and the timeout: four granted (one after a wait in the table)
    first, second, queued, _third, timed_out = sorted(leases, key=lambda s: s.start_time)

    # The lease span is a child of the application's span, and carries the lease's identity.
    assert first.parent is not None and first.parent.span_id == request.get_span_context().span_id
    assert dict(first.attributes) == {
        t.POOL_NAME: pool,
        t.DB_SYSTEM_NAME: "postgresql",
        t.DB_NAMESPACE: b.dbname,
        t.SLOT: slot,
        t.GENERATION: 1,
        t.BACKEND_PID: pid,
        t.LEASE_WAIT: pytest.approx(first.attributes[t.LEASE_WAIT]),
        t.OUTCOME: t.OUTCOME_GRANTED,
        t.RELEASE: "clean",
    }
    assert [e.name for e in first.events] == [t.GRANTED_EVENT]
    assert second.attributes[t.OUTCOME] == t.OUTCOME_GRANTED and second.parent is None

    # Nothing was idle: the waiter waited in the table's queue until `a` committed and handed it the
    # backend; its span starts at the request and says how long it waited.
    assert queued.attributes[t.OUTCOME] == t.OUTCOME_GRANTED
    assert queued.attributes[t.SLOT] == slot
    assert queued.attributes[t.LEASE_WAIT] >= 0.1
    assert queued.end_time - queued.start_time >= 100_000_000
    assert queued.status.status_code is StatusCode.UNSET

    # The timeout: an error span of the full wait, with the exception recorded.
    assert timed_out.attributes[t.OUTCOME] == t.OUTCOME_TIMEOUT
    assert timed_out.attributes[t.ERROR_TYPE] == "pgreuse.errors.PoolTimeout"
    assert timed_out.status.status_code is StatusCode.ERROR
    assert [e.name for e in timed_out.events] == ["exception"]
    assert (timed_out.end_time - timed_out.start_time) / 1e9 >= 0.29
    assert t.SLOT not in timed_out.attributes

    m = otel.metrics()
    assert set(m) == {
        t.CONNECTION_COUNT,
        t.CONNECTION_MAX,
        t.CONNECTION_IDLE_MIN,
        t.PENDING_REQUESTS,
        t.TIMEOUTS,
        t.WAIT_TIME,
        t.USE_TIME,
    }  # fmt: skip  (create_time appears once a backend is opened: see the next test)
    assert _value(m, t.CONNECTION_COUNT, pool, db_client_connection_state="idle").value == 1
    assert _value(m, t.CONNECTION_COUNT, pool, db_client_connection_state="used").value == 0
    assert _value(m, t.CONNECTION_MAX, pool).value == 1
    assert _value(m, t.CONNECTION_IDLE_MIN, pool).value == 1
    assert _value(m, t.PENDING_REQUESTS, pool).value == 0
    assert _value(m, t.TIMEOUTS, pool).value == 1
    wait = _value(m, t.WAIT_TIME, pool)
    assert wait.count == 4  # the leases granted, one of them after a wait
    assert wait.max >= 0.1
    assert _value(m, t.USE_TIME, pool).count == 4
    assert {name: unit for name, (unit, _) in m.items()} == {
        t.CONNECTION_COUNT: "{connection}", t.CONNECTION_MAX: "{connection}",
        t.CONNECTION_IDLE_MIN: "{connection}", t.PENDING_REQUESTS: "{request}", t.TIMEOUTS: "{timeout}",
        t.WAIT_TIME: "s", t.USE_TIME: "s",
    }  # fmt: skip
    # Seconds, in buckets that resolve sub-millisecond waits (the SDK's default starts at 5).
    assert wait.explicit_bounds[0] == 0.0001


def _timed(conn: pgreuse.Connection) -> float:
    t0 = time.monotonic()
    conn.execute("select 1")  # (a transaction: it waits in the table, not in the proxy)
    conn.commit()
    return time.monotonic() - t0


def test_broken_backend_ends_the_span_as_an_error(make_broker, otel, pg):
    b = make_broker("--max-size", "1")
    with b.connect() as conn:
        (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    (span,) = [s for s in otel.spans.get_finished_spans() if s.name == t.SPAN_NAME]
    assert span.attributes[t.OUTCOME] == t.OUTCOME_BROKEN
    assert span.attributes[t.RELEASE] == "broken"
    assert span.status.status_code is StatusCode.ERROR


def test_create_time_and_one_reporter_per_pool(make_broker, otel):
    b = make_broker("--max-size", "2", "--min-size", "1")
    pool = f"{b.socket_dir}:{b.port}/{b.dbname}"
    with b.connect() as a, b.connect() as c:
        a.execute("select 1")  # holds the one open backend: c's lease makes the broker open another
        c.execute("select 1")
        a.commit()
        c.commit()
    b.wait_for(lambda s: s.counters["backends_opened"] == 2, what="a second backend")
    m = otel.metrics()
    create = _value(m, t.CREATE_TIME, pool)
    # The baseline is the first connect of this process: only the second backend is new since.
    assert create.count == 1 and 0 < create.sum < 5

    # Another reader of the same table (as another worker would be) does not report while this
    # process does, and takes over once this one lets go (as when a worker exits).
    (ours,) = [p for p in t.registered_pools() if p.name == pool]
    other = t._TableReader(table_path(b.socket_dir, b.port), ours.attributes)
    assert other.read() is None
    ours.reader._drop()
    assert other.read() is not None
    assert ours.reader.read() is None
    other._drop()


def test_a_forked_child_does_not_report_the_parents_pool(make_broker, otel):
    b = make_broker("--max-size", "1")
    with b.connect() as conn:
        conn.execute("select 1")
        conn.commit()
    (ours,) = [p for p in t.registered_pools() if p.table_path == table_path(b.socket_dir, b.port)]
    assert ours.reader.read() is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        os._exit(0 if ours.reader.read() is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ours.reader.read() is not None  # the parent still reports


def test_without_an_sdk_no_span_is_made(make_broker):
    b = make_broker("--max-size", "1")
    assert not t._get().tracing()
    with b.connect(autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_gunicorn_example_sets_up_the_sdk_in_each_worker(pg, short_tmp):
    """examples/otel: the SDK is set up in post_fork; every worker exports its lease spans (the
    batch processor flushes when Gunicorn stops the worker) and the pool metrics get exported."""
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "otel")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, PGREUSE_DSN=pg.dsn(), PGREUSE_SOCKET_DIR=short_tmp, PGREUSE_PORT="6432",
        PGREUSE_MAX_SIZE="2", WEB_CONCURRENCY="2", OTEL_EXPORT_SECONDS="0.5",
    )  # fmt: skip
    out_path, err_path = os.path.join(short_tmp, "out.log"), os.path.join(short_tmp, "err.log")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", os.path.join(example, "gunicorn.conf.py"),
             "--chdir", example, "--bind", f"127.0.0.1:{port}", "app:app"],
            env=env, stdout=out, stderr=err,
        )  # fmt: skip
    try:
        served: list[int] = []  # worker pids
        deadline = time.monotonic() + 30
        while len(served) < 20:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                    served.append(json.loads(resp.read())["worker"])
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(err_path) as f:
                        pytest.fail(f"gunicorn did not serve:\n{f.read()[-5000:]}")
                time.sleep(0.1)
        time.sleep(1.0)  # at least one periodic metric export
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    with open(out_path) as f:
        text = f.read()
    assert text.count('"name": "pgreuse.lease"') >= 20, text[-3000:]
    assert '"pgreuse.lease.outcome": "granted"' in text
    assert '"parent_id": null' in text  # the request spans
    assert '"name": "db.client.connection.max"' in text
    assert '"name": "db.client.connection.wait_time"' in text


def test_async_leases_are_traced_and_timed_too(make_broker, otel):
    b = make_broker("--max-size", "1", "--wait-timeout", "0.3")
    pool = f"{b.socket_dir}:{b.port}/{b.dbname}"

    async def main() -> None:
        async with await pgreuse.connect_async(b.conninfo) as a, await pgreuse.connect_async(b.conninfo) as c:
            with otel.tracer.start_as_current_span("request"):
                await a.execute("select 1")
                with pytest.raises(pgreuse.PoolTimeout):
                    await c.execute("select 1")
                await a.commit()

    asyncio.run(main())
    granted, timed_out = sorted(
        (s for s in otel.spans.get_finished_spans() if s.name == t.SPAN_NAME), key=lambda s: s.start_time
    )
    assert granted.attributes[t.OUTCOME] == t.OUTCOME_GRANTED and granted.attributes[t.RELEASE] == "clean"
    assert timed_out.attributes[t.OUTCOME] == t.OUTCOME_TIMEOUT
    assert granted.parent is not None and timed_out.parent == granted.parent
    m = otel.metrics()
    assert _value(m, t.WAIT_TIME, pool).count == 1 and _value(m, t.USE_TIME, pool).count == 1
    assert _value(m, t.TIMEOUTS, pool).value == 1
