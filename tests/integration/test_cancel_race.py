"""A cancel meant for one client never cancels another's query (issue #13; PgBouncer's PR #717 and
its test_cancel_race). One backend, two clients taking turns on it: A runs short statements while a
thread sends cancels for A every millisecond; B runs short statements and never cancels. B must see
no QueryCanceled, on the handoff path (pgreuse connections, which claim the backend in the table)
and on the proxy path (plain psycopg through the broker); and A's cancels must still land.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import psycopg
import pytest

from broker_process import needs_claims

STORM_SECONDS = 3.0


def _storm(a: Any, b: Any) -> tuple[int, int, int]:
    """Run the storm; return (A's statements, A's cancelled ones, B's cancelled ones)."""
    stop = threading.Event()
    counts = {"a": 0, "a_cancelled": 0, "b": 0, "b_cancelled": 0}
    failures: list[BaseException] = []

    def canceller() -> None:
        while not stop.is_set():
            with contextlib.suppress(psycopg.Error):
                a.cancel()  # (psycopg's PQcancel: a CancelRequest with A's key, to the broker)
            time.sleep(0.001)

    def run(conn: Any, who: str) -> None:
        # A's statements run a little longer, so that some of its cancels land while they run.
        statement = "select pg_sleep(0.002)" if who == "a" else "select pg_sleep(0.0005)"
        try:
            while not stop.is_set():
                try:
                    conn.execute(statement)
                    counts[who] += 1
                except psycopg.errors.QueryCanceled:
                    counts[f"{who}_cancelled"] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=canceller),
        threading.Thread(target=run, args=(a, "a")),
        threading.Thread(target=run, args=(b, "b")),
    ]
    for t in threads:
        t.start()
    time.sleep(STORM_SECONDS)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures
    print(f"\nA: {counts['a']} ok, {counts['a_cancelled']} cancelled; B: {counts['b']} ok, "
          f"{counts['b_cancelled']} cancelled")  # fmt: skip
    assert counts["b"] > 50, counts  # B ran, taking turns with A on the one backend
    return counts["a"], counts["a_cancelled"], counts["b_cancelled"]


@needs_claims
def test_a_cancel_for_one_client_never_cancels_another_handoff(make_broker):
    broker = make_broker("--max-size", "1", "--min-size", "1")
    broker.settle()
    with broker.connect(autocommit=True) as a, broker.connect(autocommit=True) as b:
        _a_ok, a_cancelled, b_cancelled = _storm(a, b)
    assert b_cancelled == 0, f"{b_cancelled} of B's statements were cancelled by cancels sent for A"
    assert a_cancelled > 0  # the cancels that should land still do


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_cancel_for_one_client_never_cancels_another_proxy(make_broker, monkeypatch, loop):
    if loop == "asyncio":
        monkeypatch.setenv("PGREUSE_LOOP", "asyncio")
    broker = make_broker("--max-size", "1", "--min-size", "1")
    conninfo = f"host={broker.socket_dir} port={broker.port} dbname={broker.dbname}"
    # (prepare_threshold=None: named prepared statements do not survive transaction pooling)
    with (
        psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as a,
        psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as b,
    ):
        _a_ok, a_cancelled, b_cancelled = _storm(a, b)
    assert b_cancelled == 0, f"{b_cancelled} of B's statements were cancelled by cancels sent for A"
    assert a_cancelled > 0
