"""The shared-memory table's layout: what the broker writes is what every reader sees. No server."""

from __future__ import annotations

import os
import struct

import pytest

from pgreuse.shm import LAYOUT_VERSION, Table, TableError, table_path
from pgreuse.snapshot import histogram_quantile
from pgreuse.wire.states import CloseReason, SlotState


@pytest.fixture
def table(short_tmp):  # type: ignore[no-untyped-def]
    t = Table.create(table_path(short_tmp, 6432), max_size=3, min_size=1, wait_timeout=2.5,
                     database="app", user="web")  # fmt: skip
    yield t
    t.close()


def test_a_reader_sees_what_the_broker_wrote(table):
    table.write_slot(
        1, state=SlotState.LENT, close_reason=CloseReason.NONE, dirty=True, generation=4,
        backend_pid=4242, holder_pid=777, lease_started_ns=123, leases=9, use_ns=55, opened_at=1.5,
    )  # fmt: skip
    table.add("leases", 3)
    table.add("pending", 2)
    table.add("pending", -5)  # gauges never go below zero
    table.count_close(CloseReason.HOLDER_EXITED)
    table.observe_wait(0.0002)
    reader = Table.open(table.path)
    try:
        snap = reader.snapshot()
    finally:
        reader.close()
    assert (snap.max_size, snap.min_size, snap.wait_timeout, snap.database, snap.user) == (
        3, 1, 2.5, "app", "web",
    )  # fmt: skip
    assert snap.broker_pid == os.getpid()
    slot = snap.slots[1]
    assert (slot.state, slot.dirty, slot.generation, slot.backend_pid, slot.holder_pid) == (
        SlotState.LENT, True, 4, 4242, 777,
    )  # fmt: skip
    assert snap.slots[0].state is SlotState.CLOSED and snap.count(SlotState.LENT) == 1
    assert snap.counters["leases"] == 3 and snap.counters["pending"] == 0
    assert snap.closed_by_reason["holder_exited"] == 1
    assert histogram_quantile(snap.wait_histogram, 0.5) == 0.00025


def test_a_table_of_another_layout_version_is_refused(table):
    with open(table.path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", LAYOUT_VERSION + 1))
    with pytest.raises(TableError, match=f"layout version {LAYOUT_VERSION + 1}"):
        Table.open(table.path)


def test_not_a_table_is_refused(short_tmp):
    path = os.path.join(short_tmp, "junk.shm")
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    with pytest.raises(TableError, match="not a pgreuse table"):
        Table.open(path)
    with open(path, "wb") as f:
        f.write(b"short")
    with pytest.raises(TableError, match="too small"):
        Table.open(path)
