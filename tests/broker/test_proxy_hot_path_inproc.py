"""The proxy's fast path in process, with no server: the pool and proxy sessions of this process on
the socket pair of a fake backend, driven one callback at a time.

What the broker's cuts of a byte stream, a refusal answered inside the read callback, the shared
expiry timer and the bookkeeping after a lease must not break. (The same path against a real broker
and PostgreSQL: test_proxy_hot_path.py.)
"""

from __future__ import annotations

import asyncio
import time

import pytest

from inproc import in_process_pool, in_process_session, open_fake_backend
from pgreuse.wire import control, frames
from pgreuse.wire.states import CloseReason, SlotState

# -- the frame scanner at every split point (no server needed: what is tested is how the broker cuts
# -- a byte stream it is given, the way a server's answer may arrive in any number of reads) ---------


ANSWER = (
    frames.frame(b"1", b"")  # ParseComplete: a 5-byte message
    + frames.frame(b"T", b"\0\x01a\0" + b"\0" * 6 + b"\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
    + frames.frame(b"D", b"\0\x01\0\0\0\x0242")
    + frames.frame(b"C", b"SELECT 1\0")
    + frames.frame(b"Z", b"I")
)
QUERY = frames.frame(b"Q", b"select 42\0")


def test_the_scanner_finds_the_end_of_a_transaction_however_the_answer_is_cut(short_tmp):
    async def run() -> None:
        pool = in_process_pool(str(short_tmp), 6999)
        table = pool.table
        b, backend_end = open_fake_backend(pool)
        session, outer = in_process_session(pool)
        inner = session.sock
        outer.settimeout(5)
        backend_end.settimeout(5)
        for cut in range(1, len(ANSWER)):
            outer.sendall(QUERY)
            session._client_readable()
            assert backend_end.recv(65536) == QUERY
            for part in (ANSWER[:cut], ANSWER[cut:]):
                assert session.backend is b, f"cut at {cut}: given back before the answer ended"
                backend_end.sendall(part)
                b.dispatch_readable()
            got = b""
            while len(got) < len(ANSWER):
                got += outer.recv(65536)
            assert got == ANSWER, f"cut at {cut}"
            assert session.backend is None, f"cut at {cut}: not given back at ReadyForQuery"
            assert b.state is SlotState.IDLE
        session.close()
        pool.flush_table()  # (what the broker's flush timer does within TABLE_LAG)
        assert table.snapshot().counters["leases"] == len(ANSWER) - 1
        pool._close(b, CloseReason.SHUTDOWN, graceful=False)
        for sock in (inner, outer, backend_end):
            sock.close()
        table.close()

    asyncio.run(run())


def test_an_empty_parse_refused_at_once_is_answered_like_a_server(short_tmp):
    # The same message alone in one read takes the fast path; with PostgreSQL unreachable the pool
    # refuses at once, inside the read callback, and the refusal replays the empty Parse.
    async def run() -> None:
        pool = in_process_pool(str(short_tmp), 6998)
        pool.last_connect_error = "connection refused"  # as after a failed connect: fail fast
        pool._retry_at = time.monotonic() + 60
        session, outer = in_process_session(pool)
        outer.send(frames.frame(b"P", b""))
        session._client_readable()
        outer.send(frames.frame(b"S", b""))
        session._client_readable()
        outer.settimeout(5)
        reader = frames.FrameReader()
        reader.feed(outer.recv(65536))
        types = []
        while (msg := reader.next_message()) is not None:
            types.append((msg.type, bytes(msg.body)))
        assert [t for t, _ in types] == [b"E", b"Z"]
        assert b"cannot reach PostgreSQL" in types[0][1]
        session.close()
        for sock in (session.sock, outer):
            sock.close()
        pool.drop_exits()
        pool.table.close()

    asyncio.run(run())


def test_a_failing_refusal_does_not_strand_the_other_waiters(short_tmp):
    # Several requests expire in one pass of the shared timer. If answering one of them fails (a
    # bug in that client's code), the others must still be refused and the timer re-armed for the
    # requests still queued.
    class Client:
        in_process = False

        def __init__(self, pid: int, fail: bool = False) -> None:
            self.pid, self.fds, self.fail = pid, {}, fail
            self.got: list[control.Message] = []

        def send(self, msg: control.Message, fd: int | None = None) -> None:
            if self.fail:
                raise RuntimeError("a client that cannot take its answer")
            self.got.append(msg)

    async def run() -> None:
        pool = in_process_pool(str(short_tmp), 6997, wait_timeout=0.4)
        pool.proxy_only = False
        pool._states[SlotState.CLOSED] = 0  # no room to open a backend: requests only queue
        bad, good = Client(1, fail=True), Client(2)
        pool.request(bad, 1, 1)
        pool.request(good, 2, 2)
        await asyncio.sleep(0.2)
        late = Client(3)
        pool.request(late, 3, 3)  # queued later: (normally) still waiting when the first two expire
        for _ in range(100):  # the good one in the first pass; the late one after the re-arm
            if good.got and late.got:
                break
            await asyncio.sleep(0.05)
        assert [type(m) for m in good.got] == [control.Deny]
        assert [type(m) for m in late.got] == [control.Deny]
        assert not pool.waiters
        pool.drop_exits()
        pool.table.close()

    asyncio.run(run())


@pytest.mark.parametrize("reference", [False, True], ids=["running", "reference"])
def test_a_queued_proxy_request_opens_another_backend_if_a_slot_is_free(short_tmp, reference):
    # One backend open and lent, one slot closed: the second client's query queues, and the pool
    # must start opening the free slot for it at once (not leave it waiting for the first client).
    async def run() -> None:
        pool = in_process_pool(str(short_tmp), 6996, max_size=2)
        b, backend_end = open_fake_backend(pool)
        first, first_end = in_process_session(pool, key=1, reference=reference)
        second, second_end = in_process_session(pool, key=2, reference=reference)
        first_end.sendall(QUERY)
        first._client_readable()
        assert first.backend is b
        assert pool._states[SlotState.CLOSED] == 1
        second_end.sendall(QUERY)
        second._client_readable()
        assert [w.client for w in pool.waiters] == [second]
        assert pool._states[SlotState.CONNECTING] == 1, "the free slot was not opened for the waiter"
        for s in (first, second):
            s.close()  # (the first one's backend goes with it: its transaction was cut short)
        for sock in (first.sock, second.sock, first_end, second_end, backend_end, b.sock):
            if sock is not None:
                sock.close()
        await asyncio.gather(*pool._tasks)  # the connect attempt (no server here: it fails)
        pool.drop_exits()
        pool.table.close()

    asyncio.run(run())


@pytest.mark.parametrize("reference", [False, True], ids=["running", "reference"])
def test_a_query_is_not_lost_when_the_bookkeeping_after_its_lease_fails(short_tmp, reference):
    # The lease's bookkeeping runs after the backend is granted (the query first). If it fails (here
    # the table's flush timer cannot be armed), the error must surface without losing the query:
    # the backend has it, as it would have without the failure.
    async def run() -> None:
        pool = in_process_pool(str(short_tmp), 6995)
        b, backend_end = open_fake_backend(pool)
        session, outer = in_process_session(pool, reference=reference)

        def broken() -> None:
            raise RuntimeError("no timer today")

        pool._flush_soon = broken  # type: ignore[method-assign]
        outer.sendall(QUERY)
        with pytest.raises(RuntimeError, match="no timer today"):
            session._client_readable()
        del pool._flush_soon  # (the pool's own again)
        backend_end.settimeout(5)
        assert backend_end.recv(65536) == QUERY
        assert session.backend is b
        session.close()
        for sock in (session.sock, outer, backend_end, b.sock):
            if sock is not None:
                sock.close()
        pool.drop_exits()
        pool.table.close()

    asyncio.run(run())
