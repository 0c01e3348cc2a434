"""The proxy session's C core (pgreuse._proxycore) against its Python reference (PyProxySession).

The C core overrides the methods every proxied transaction runs, and does the pool's part of the
usual lease and release (_lending.h), and must do exactly what the Python methods do.
Here both run the same random scripts, each on its own in-process pool with one fake backend: two
clients take turns and queue behind each other (so backends are handed over), transactions span
several exchanges, client messages and server answers are cut at random places, answers are
larger than the receive buffer, a SET's ParameterStatus makes the backend dirty (and the pool
resets it), a named Parse is refused, a Flush arrives with nothing in flight. After every step the
bytes each side received, every field of both sessions and the pool's lending state (slot counts, the idle
stack, the queue, the slot's lease fields, the counters noted for the table) must be identical, and
the bytes must be what a direct connection would carry.

(The broker-level proxy tests run against whichever implementation the environment selects: nox
runs them on both.)
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from typing import Any

import pytest

from inproc import in_process_pool, in_process_session, open_fake_backend
from pgreuse.broker import pool as pool_module
from pgreuse.broker import proxy
from pgreuse.wire.frames import frame
from pgreuse.wire.states import CloseReason, SlotState

pytestmark = pytest.mark.skipif(
    proxy.CORE != "c" and os.environ.get("PGREUSE_EXPECT_SCAN") != "c",
    reason="the C core is not built, or PGREUSE_PURE_PYTHON=1",
)

FIELDS = (
    "_syncs", "_unsynced", "_tx", "_b_left", "_b_stash", "_c_left", "_c_stash", "_dirty",
    "_quitting", "_want_lease", "proxied", "closed", "_to_backend", "_to_client", "_c_reading",
    "_c_writing", "_b_writing", "_rejecting",
)  # fmt: skip
STATS = ("xacts", "queries", "received", "sent", "denied", "broken")


def _rows(rng: random.Random) -> bytes:
    big = rng.random() < 0.1  # larger than the 256 KiB receive buffer: a message spans reads
    size = 300_000 if big else rng.randrange(0, 40)
    row = frame(b"D", b"\0\x01" + size.to_bytes(4, "big") + b"x" * size)
    rows = row * rng.randrange(0, 4)
    return frame(b"T", b"\0\x01a\0" + b"\0" * 6 + b"\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0") + rows


def _exchange(rng: random.Random, status: bytes, named: bool = True) -> tuple[bytes, bytes, bool]:
    """(client bytes, server answer, needs a backend) for one round trip ending at ``status``."""
    kinds = ("simple", "extended", "pipelined", "error", "set", "flush", "named")
    kind = rng.choice(kinds if named else kinds[:-1])
    ready = frame(b"Z", status)
    if kind == "simple":
        return frame(b"Q", b"select x\0"), _rows(rng) + frame(b"C", b"SELECT 1\0") + ready, True
    if kind == "extended":
        client = (frame(b"P", b"\0select $1\0\0\0") + frame(b"B", b"\0\0\0\0\0\0\0\0")
                  + frame(b"D", b"P\0") + frame(b"E", b"\0\0\0\0\0") + frame(b"S", b""))  # fmt: skip
        answer = frame(b"1", b"") + frame(b"2", b"") + _rows(rng) + frame(b"C", b"SELECT 1\0") + ready
        return client, answer, True
    if kind == "pipelined":  # two sync points in one write: two answers
        client = frame(b"Q", b"select 1\0") + frame(b"Q", b"select 2\0")
        answer = frame(b"C", b"SELECT 1\0") + frame(b"Z", b"T" if status == b"T" else b"I")
        return client, answer + frame(b"C", b"SELECT 1\0") + ready, True
    if kind == "error":
        return frame(b"Q", b"oops\0"), frame(b"E", b"SERROR\0C42601\0Msyntax\0\0") + ready, True
    if kind == "set":  # changes a reported parameter: the backend goes back dirty
        answer = frame(b"S", b"DateStyle\0German\0") + frame(b"C", b"SET\0") + ready
        return frame(b"Q", b"set datestyle = german\0"), answer, True
    if kind == "flush":  # Flush then a query: the Flush alone needs no backend
        return frame(b"H", b"") + frame(b"Q", b"select 3\0"), frame(b"C", b"SELECT 1\0") + ready, True
    # A named Parse: refused by the broker outside a transaction (answered at Sync), forwarded inside.
    client = frame(b"P", b"s1\0select 1\0\0\0") + frame(b"S", b"")
    return client, frame(b"1", b"") + ready, False


def _transaction(rng: random.Random, alone: bool) -> list[tuple[bytes, bytes, bool]]:
    """Exchanges up to ReadyForQuery ``I``. Not ``alone`` (another client queues behind it): the
    first one takes the backend (a refused one would leave it to the other client)."""
    n = rng.choice((1, 1, 1, 2, 3))
    return [_exchange(rng, b"T" if i < n - 1 else b"I", named=alone or i > 0) for i in range(n)]


def _cuts(rng: random.Random, data: bytes, most: int) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, most + 1))))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _drain(sock: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


async def _world(tmp: str, port: int, seed: int, reference: bool) -> list[Any]:
    """Run script ``seed`` on a fresh pool; return the trace of what every step left behind."""
    rng = random.Random(seed)
    pool = in_process_pool(tmp, port, wait_timeout=30.0)
    b, server = open_fake_backend(pool)
    server.setblocking(False)
    sessions = [in_process_session(pool, key=k + 1, reference=reference) for k in range(2)]
    for _, outer in sessions:
        outer.setblocking(False)
    trace: list[Any] = []
    expected_client = [b"", b""]
    received = [b"", b""]

    def snapshot(step: str) -> None:
        states = []
        for s, _ in sessions:
            fields = [bytes(v) if isinstance(v, bytearray) else v for v in (getattr(s, f) for f in FIELDS)]
            stats = [getattr(s.stats, f) for f in STATS]
            states.append((s.backend is not None, s._request is None, fields, stats))
        holder = b.holder.parking_key if b.holder is not None else None  # type: ignore[attr-defined]
        watch = "pool" if b.on_readable is b.idle_watch else "session" if b.on_readable else None
        table = pool.table
        lending = (
            dict(pool._states), len(pool.idle), len(pool.waiters), b.leases, b.parking,
            bool(b.lease_started_ns), b.use_ns > 0, watch, b.watched, b in pool._lagging,
            pool._flush_timer is not None, table._n_leases, table._n_waits,
            sum(table._n_hist),  # (not the buckets: which one is a matter of timing)
        )  # fmt: skip
        if step.endswith("sent"):
            # Write the table here (in both worlds): the releases that follow must note the slot
            # again for the next batch.
            pool.flush_table()
            slot = pool.table.snapshot().slots[0]
            lending += (slot.state, slot.leases, slot.holder_pid)
        deliver()
        trace.append((step, states, b.state, holder, lending, _drain(server), list(received)))

    async def settle() -> None:
        # A dirty backend is reset by a task: answer its DISCARD ALL like a server would.
        for _ in range(200):
            if b.state is not SlotState.RESETTING:
                return
            got = _drain(server)
            if got:
                assert got.startswith(b"Q") and b"DISCARD ALL" in got
                server.send(frame(b"C", b"DISCARD ALL\0") + frame(b"Z", b"I"))
            await asyncio.sleep(0.001)
        raise AssertionError("the reset did not finish")

    def client_sends(i: int, data: bytes, needs_backend: bool) -> bool:
        """Send ``data`` from client ``i``; True if the broker refuses it (a named Parse that
        would start a transaction)."""
        session, outer = sessions[i]
        idle = session.backend is None and session._request is None and not session._want_lease
        for part in _cuts(rng, data, 3):
            outer.send(part)
            session._client_readable()
        return not needs_backend and idle

    def deliver() -> None:
        # The clients read all they are sent; a session that buffered a reply (the client's socket
        # was full) writes it when its socket is writable, as the loop would call it.
        for k, (session, outer) in enumerate(sessions):
            while True:
                received[k] += _drain(outer)
                if not session._to_client or session.closed:
                    break
                session._client_writable()

    def server_answers(answer: bytes) -> None:
        for part in _cuts(rng, answer, 4):
            rest = part
            while rest:  # a part may be larger than the socket takes at once
                rest = rest[server.send(rest) :]
                b.dispatch_readable()
                deliver()

    for step in range(12):
        first = rng.randrange(2)
        order = [first, 1 - first] if rng.random() < 0.5 else [first]
        txs = {i: _transaction(rng, alone=len(order) == 1) for i in order}
        # Every client sends its first exchange; the second queues behind the first's transaction.
        refused = {i: client_sends(i, txs[i][0][0], txs[i][0][2]) for i in order}
        snapshot(f"{step}: sent")
        for i in order:
            for n, (client, answer, needs_backend) in enumerate(txs[i]):
                if n:
                    refused[i] = client_sends(i, client, needs_backend)
                if refused[i]:
                    expected_client[i] += b"refused"
                    snapshot(f"{step}: refused {i}")
                    continue
                server_answers(answer)
                expected_client[i] += answer
                snapshot(f"{step}: answered {i}.{n}")
            await settle()
    for session, _ in sessions:
        session.close()
    await settle()
    snapshot("closed")
    if b.state is not SlotState.CLOSED:
        pool._close(b, CloseReason.SHUTDOWN, graceful=False)
    pool.flush_table()  # (and its timer: the table closes below)
    server.close()
    for session, outer in sessions:
        session.sock.close()
        outer.close()
    pool.table.close()
    # What each client received is the server's answers, in order (a refusal is the broker's own
    # ErrorResponse and ReadyForQuery).
    for i in range(2):
        for part in expected_client[i].split(b"refused"):
            assert part in received[i]
    return trace


@pytest.mark.parametrize("seed", range(40))
def test_the_c_core_does_what_the_reference_does(short_tmp, seed, monkeypatch):
    assert proxy.CORE == "c", "PGREUSE_EXPECT_SCAN=c but the C core does not run"
    # The table's batch timer must not fire in one world and not the other (it resets the counters
    # compared below): an hour's lag keeps it armed until the end.
    monkeypatch.setattr(pool_module, "TABLE_LAG", 3600.0)

    async def run() -> tuple[list[Any], list[Any]]:
        c = await _world(str(short_tmp), 6990, seed, reference=False)
        py = await _world(str(short_tmp), 6991, seed, reference=True)
        return c, py

    c, py = asyncio.run(run())
    assert len(c) == len(py)
    for got, want in zip(c, py, strict=True):
        assert got == want, f"seed {seed}, step {want[0]}"
