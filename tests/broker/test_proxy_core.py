"""The proxy session's C core (pgreuse.broker._proxycore) against its Python reference (PyProxySession).

The C core overrides the methods every proxied transaction runs, and does the pool's part of the
usual lease and release (_lending.h), and must do exactly what the Python methods do.
Here both run the same random scripts, each on its own in-process pool with one fake backend: two
clients take turns and queue behind each other (so backends are handed over), transactions span
several exchanges, client messages and server answers are cut at random places, answers are
larger than the receive buffer, a SET's ParameterStatus makes the backend dirty (and the pool
resets it), a named Parse is refused, a Flush arrives with nothing in flight, a notice follows the
last ReadyForQuery in a later read, socket buffers are small enough for sends to stop short, a
client quits before its answer, session mode, and scripts end with the server gone or garbled
(tests/proxy_scripts.py makes the scripts). After every step the bytes each side received, every
field of both sessions and the pool's lending state (slot counts, the idle stack, the queue, the
slot's lease fields, the counters noted for the table) must be identical, and the bytes must be
what a direct connection would carry.

(The broker-level proxy tests run against whichever implementation the environment selects: nox
runs them on both.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import select
import socket
from typing import Any

import attrs
import pytest

from inproc import in_process_pool, in_process_session, open_fake_backend
from pgreuse.broker import mirror, proxy
from pgreuse.broker import pool as pool_module
from pgreuse.wire.frames import frame
from pgreuse.wire.states import CloseReason, SlotState
from proxy_scripts import NOTICE, cuts, transaction

pytestmark = pytest.mark.skipif(
    proxy.CORE != "c" and os.environ.get("PGREUSE_EXPECT_SCAN") != "c",
    reason="the C core is not built, or PGREUSE_PURE_PYTHON=1",
)

FIELDS = (
    "_syncs", "_unsynced", "_tx", "_b_left", "_b_stash", "_c_left", "_c_stash", "_dirty",
    "_quitting", "_want_lease", "proxied", "closed", "_to_backend", "_to_client", "_c_reading",
    "_c_writing", "_b_writing", "_rejecting", "_bfd",
)  # fmt: skip
STATS = ("xacts", "queries", "received", "sent", "denied", "broken")
SEEDS = 48
SESSION_MODE_SEEDS = range(40, SEEDS)  # one client: in session mode the backend stays with it


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


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def _take_refusal(received: bytes) -> bytes:
    """``received`` without the ErrorResponse and ReadyForQuery ``I`` it starts with."""
    assert received[:1] == b"E", received[:40]
    end = 1 + int.from_bytes(received[1:5], "big")
    assert received[end:end + 6] == frame(b"Z", b"I"), received[:end + 6]  # fmt: skip
    return received[end + 6 :]


async def _world(tmp: str, port: int, seed: int, reference: bool) -> list[Any]:
    """Run script ``seed`` on a fresh pool; return the trace of what every step left behind."""
    rng = random.Random(seed)
    session_mode = seed in SESSION_MODE_SEEDS
    # Some seeds reset every backend after every lease (no lease or release is the usual one then).
    pool = in_process_pool(tmp, port, wait_timeout=30.0, reset_every_lease=seed % 12 == 5)
    b, server = open_fake_backend(pool)
    server.setblocking(False)
    clients = 1 if session_mode else 2
    sessions = [
        in_process_session(pool, key=k + 1, reference=reference, session_mode=session_mode)
        for k in range(clients)
    ]
    # Small socket buffers: sends stop short, and replies and queries wait for writability.
    small, small_backend = rng.random() < 0.3, rng.random() < 0.3
    for session, outer in sessions:
        outer.setblocking(False)
        for sock in (session.sock, outer) if small else ():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if small_backend:
        for sock in (b.sock, server):
            assert sock is not None
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    trace: list[Any] = []
    expected: list[list[bytes | None]] = [[] for _ in sessions]  # None: a refusal
    # What the pool logs, debug included (the slot transitions it logs while pool._debug is on).
    logged: list[str] = []
    handler = _Collect(logged)
    logging.getLogger("pgreuse.broker").addHandler(handler)
    received = [b""] * clients
    sent = [0] * clients
    at_server = [b""]  # since the last snapshot
    server_log = [b""]  # all of it
    resets_answered = [0]

    def readable(sock: socket.socket | None) -> bool:
        return sock is not None and sock.fileno() >= 0 and bool(select.select([sock], [], [], 0)[0])

    def deliver(readers: bool = True) -> None:
        """Run what the loop would run until nothing is left to do: the peers read all they are
        sent (``readers``; else they are slow and read nothing yet), and the session callbacks
        registered for readable or writable sockets run."""
        for _ in range(10_000):
            if readers:
                got = _drain(server)
                at_server[0] += got
                server_log[0] += got
                for k, (_session, outer) in enumerate(sessions):
                    received[k] += _drain(outer)
            ran = False
            for session, _ in sessions:
                if session.closed:
                    continue
                if session._b_writing:
                    session._backend_writable()
                    ran = True
                if session._c_writing and not session.closed:
                    session._client_writable()
                    ran = True
                if session._c_reading and not session.closed and readable(session.sock):
                    session._client_readable()
                    ran = True
            if b.watched and readable(b.sock):
                b.dispatch_readable()
                ran = True
            if not ran or not readers:
                return
        raise AssertionError("the loop never came to rest")

    def snapshot(step: str) -> None:
        deliver()
        states = []
        for s, _ in sessions:
            fields = [bytes(v) if isinstance(v, bytearray) else v for v in (getattr(s, f) for f in FIELDS)]
            stats = [getattr(s.stats, f) for f in STATS]
            states.append((s.backend is not None, s._request is None, bool(s._request_ns),
                           s.stats.wait_ns > 0, fields, stats))  # fmt: skip
        holder = b.holder.parking_key if b.holder is not None else None  # type: ignore[attr-defined]
        watch = "pool" if b.on_readable is b.idle_watch else "session" if b.on_readable else None
        queue = [(w.client.parking_key, w.parking, w.deadline_ns - w.enqueued_ns) for w in pool.waiters]
        lending = (
            dict(pool._states), len(pool.idle), queue, b.leases, b.parking,
            bool(b.lease_started_ns), b.use_ns > 0, watch, b.watched, b in pool._lagging,
            pool._flush_timer is not None, pool._noted_leases, pool._noted_waits,
            sum(pool._noted_hist),  # (not the buckets: which one is a matter of timing)
            pool._noted_use_ns > 0, pool._noted_wait_ns > 0, pool._max_pending, pool._expiry is not None,
        )  # fmt: skip
        if step.endswith("sent"):
            # Write the table here (in both worlds): the releases that follow must note the slot
            # again for the next batch.
            pool.flush_table()
            slot = pool.table.snapshot().slots[0]
            lending += (slot.state, slot.leases, slot.holder_pid)
        trace.append((step, states, b.state, holder, lending, at_server[0], list(received), list(logged)))
        at_server[0] = b""
        logged.clear()

    async def settle() -> None:
        # A dirty backend is reset by a task: answer its DISCARD ALL like a server would.
        reset = frame(b"Q", b"DISCARD ALL\0")
        for _ in range(200):
            if b.state is not SlotState.RESETTING:
                return
            got = _drain(server)
            at_server[0] += got
            server_log[0] += got
            if server_log[0].count(reset) > resets_answered[0]:
                resets_answered[0] += 1
                server.send(frame(b"C", b"DISCARD ALL\0") + frame(b"Z", b"I"))
            await asyncio.sleep(0.001)
        raise AssertionError("the reset did not finish")

    def client_sends(i: int, data: bytes, needs_backend: bool) -> bool:
        """Send ``data`` from client ``i``; True if the broker refuses it (a named Parse that
        would start a transaction)."""
        session, outer = sessions[i]
        idle = session.backend is None and session._request is None and not session._want_lease
        for part in cuts(rng, data, 3):
            rest = part
            while rest:
                with contextlib.suppress(BlockingIOError):
                    n = outer.send(rest)
                    rest = rest[n:]
                    sent[i] += n
                if session._c_reading:  # (what the loop would call)
                    session._client_readable()
                deliver(readers=rng.random() < 0.5)
        return not needs_backend and idle and not session_mode

    async def reaches_server(i: int) -> None:
        """Run the loop until all client ``i`` sent has been read and forwarded: a server answers
        only what it received (a reset on the way is answered too)."""
        session = sessions[i][0]
        for _ in range(1000):
            if session.stats.received == sent[i] and not session._to_backend:
                return
            if session._c_reading:
                session._client_readable()
            deliver()
            await settle()
        raise AssertionError("the query never reached the server")

    async def server_answers(i: int, answer: bytes) -> None:
        await reaches_server(i)
        boundary = len(answer) - len(NOTICE) if answer.endswith(NOTICE) else -1
        for part in cuts(rng, answer, 4, avoid=boundary):
            rest = part
            while rest:  # a part may be larger than the socket takes at once
                with contextlib.suppress(BlockingIOError):
                    rest = rest[server.send(rest) :]
                if b.watched:  # (what the loop would call)
                    b.dispatch_readable()
                deliver(readers=rng.random() < 0.5)
        deliver()

    for step in range(12):
        first = rng.randrange(clients)
        order = [first, 1 - first] if clients == 2 and rng.random() < 0.5 else [first]
        notice = not (small or small_backend)
        txs = {i: transaction(rng, alone=len(order) == 1, notice=notice) for i in order}
        if rng.random() < 0.15:  # transitions logged: the pool's own methods lend and take back
            pool._debug = not pool._debug
        # Admin PAUSE: before the requests (they queue until RESUME), or while the first client
        # holds the backend (its release must not hand it to the second until RESUME).
        pause = rng.choice((None,) * 8 + ("before", "during" if len(order) == 2 else None))
        if pause == "before":
            pool.pause()
        # Every client sends its first exchange; the second queues behind the first's transaction.
        refused = {i: client_sends(i, txs[i][0][0], txs[i][0][2]) for i in order}
        snapshot(f"{step}: sent")
        if pause == "before":
            pool.resume()
            deliver()
            snapshot(f"{step}: resumed")
        elif pause == "during":
            pool.pause()
        for i in order:
            for n, (client, answer, needs_backend) in enumerate(txs[i]):
                if n:
                    refused[i] = client_sends(i, client, needs_backend)
                if refused[i]:
                    expected[i].append(None)
                    snapshot(f"{step}: refused {i}")
                    continue
                await server_answers(i, answer)
                expected[i].append(answer)
                snapshot(f"{step}: answered {i}.{n}")
            if pause == "during" and i == order[0]:
                pool.resume()
                deliver()
                snapshot(f"{step}: resumed")
            await settle()
    ending = rng.choice(("close", "quit", "server gone", "server garbled"))
    session, outer = sessions[0]
    if ending == "quit":  # Terminate right behind a query: the backend goes back at its answer
        client_sends(0, frame(b"Q", b"select 4\0") + frame(b"X", b""), True)
        answer = frame(b"C", b"SELECT 1\0") + frame(b"Z", b"I")
        await server_answers(0, answer)
        expected[0].append(answer)
        snapshot("quit answered")
        outer.shutdown(socket.SHUT_WR)  # then its EOF
        session._client_readable()
        snapshot("quit")
        await settle()
    elif ending.startswith("server"):  # the backend fails while a query is in flight
        client_sends(0, frame(b"Q", b"select 5\0"), True)
        await reaches_server(0)
        if ending == "server gone":
            server.shutdown(socket.SHUT_WR)
        else:
            server.send(frame(b"C", b"SELECT 1\0") + b"Z\0\0\0\x02")  # a length below 4
        b.dispatch_readable()
        snapshot(ending)
    for session, _ in sessions:
        session.close()
    await settle()
    snapshot("closed")
    logging.getLogger("pgreuse.broker").removeHandler(handler)
    pool.flush_table()  # (and its timer: the table closes below)
    if b.state is not SlotState.CLOSED:
        pool._close(b, CloseReason.SHUTDOWN, graceful=False)
    server.close()
    for session, outer in sessions:
        session.sock.close()
        outer.close()
    pool.drop_exits()  # (a closed backend waits for its end otherwise)
    pool.table.close()
    # What each client received is exactly the server's answers, in order, and the broker's
    # ErrorResponse and ReadyForQuery for each refusal.
    for i in range(clients):
        rest = received[i]
        for part in expected[i]:
            if part is None:
                rest = _take_refusal(rest)
            else:
                assert rest[: len(part)] == part, f"client {i}: {rest[:60]!r} instead of {part[:60]!r}"
                rest = rest[len(part) :]
        # After a server failure: what it sent, and the broker's FATAL (compared in the trace).
        assert rest == b"" or (i == 0 and ending.startswith("server")), rest[:100]
    return trace


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_c_core_does_what_the_reference_does(short_tmp, seed, monkeypatch, caplog):
    assert proxy.CORE == "c", "PGREUSE_EXPECT_SCAN=c but the C core does not run"
    # The table's batch timer must not fire in one world and not the other (it resets the counters
    # compared below): an hour's lag keeps it armed until the end.
    monkeypatch.setattr(mirror, "TABLE_LAG", 3600.0)
    monkeypatch.setattr(mirror, "SHARE_LAG", 3600.0)
    caplog.set_level(logging.DEBUG, logger="pgreuse.broker")

    async def run() -> tuple[list[Any], list[Any]]:
        c = await _world(str(short_tmp), 6990, seed, reference=False)
        py = await _world(str(short_tmp), 6991, seed, reference=True)
        return c, py

    c, py = asyncio.run(run())
    assert len(c) == len(py)
    for got, want in zip(c, py, strict=True):
        assert got == want, f"seed {seed}, step {want[0]}"


def test_the_c_counters_have_the_reference_fields():
    # SHOW STATS reads these by name, from whichever class the broker runs.
    assert proxy.CORE == "c", "PGREUSE_EXPECT_SCAN=c but the C core does not run"
    names = [f.name for f in attrs.fields(proxy.PyProxyStats)]
    counters = proxy.ProxyStats(**dict.fromkeys(names, 7))
    assert [getattr(counters, name) for name in names] == [7] * len(names)
    assert sorted(n for n in dir(counters) if not n.startswith("_")) == sorted(names)


def test_the_c_pool_fields_refuse_what_the_c_code_could_not_read(short_tmp):
    # The lending path reads these fields without checks: a deletion or a wrong type must be an
    # error where it is made, naming the field, not a crash later on the hot path.
    assert pool_module.C_FIELDS, "the C session core runs, but the pool's fields are Python ones"

    async def make() -> pool_module.Pool:
        return in_process_pool(str(short_tmp), 6992)

    pool = asyncio.run(make())
    b = pool.slots[0]
    w = pool_module.Waiter(None, 1, 2, 3)  # type: ignore[arg-type]
    for obj, name in (
        (pool, "idle"), (pool, "_states"), (pool, "_lagging"), (pool, "_noted_hist"), (b, "holder"),
        (b, "state"), (w, "client"), (w, "request"),
    ):  # fmt: skip
        with pytest.raises(AttributeError, match=f"cannot delete {name}"):
            delattr(obj, name)
    for obj, name, value in (
        (pool, "idle", ()), (pool, "_states", []), (pool, "_lagging", frozenset()), (pool, "_noted_hist", ()),
        (pool, "_wait_bounds", []),
    ):  # fmt: skip
        with pytest.raises(TypeError, match=f"{name} must be"):
            setattr(obj, name, value)
    with pytest.raises(TypeError):
        b.watched = 1  # type: ignore[assignment]
    # What the Python code assigns is kept as assigned.
    b.leases += 2
    b.parking = 12345
    pool.waiters = pool.waiters.__class__([1])
    assert (b.leases, b.parking, list(pool.waiters)) == (2, 12345, [1])
    assert (w.client, w.request, w.parking, w.enqueued_ns, w.deadline_ns) == (None, 1, 2, 3, 0)
