"""OpenTelemetry SDK set-up for one process, exporting spans and metrics to the console.

Call :func:`setup` once per process that does the work: in Gunicorn, in ``post_fork`` (see
``gunicorn.conf.py``), never in the master before fork. The batch span processor and the periodic
metric reader each run a background thread, and a forked child gets neither thread, only their locks
and queues in whatever state the fork caught them: spans and metrics recorded in a worker would then
sit in a queue nobody exports, or the first export would deadlock on a lock held at fork time.
"""

from __future__ import annotations

import os

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter


def setup(service_name: str = "pgreuse-example", export_interval: float = 5.0) -> None:
    # One resource per process: the pool metrics are reported by one worker at a time, and the
    # instance id tells which one it was.
    resource = Resource.create(
        {"service.name": service_name, "service.instance.id": f"{os.uname().nodename}:{os.getpid()}"}
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(), export_interval_millis=export_interval * 1000
    )
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    # Both providers flush and shut down at interpreter exit (shutdown_on_exit), which is how a
    # worker that Gunicorn stops gets its last spans out.
