"""A ``dup2`` that fails while a backend's socket is swapped in or out of libpq's fd number.

``dup2`` can fail (EMFILE, EINTR, a closed number after a bug elsewhere), and the two swaps are where
a backend changes hands in a worker. A failed swap-in must give the slot back as it was (nothing was
sent on it); a failed swap-out leaves libpq's fd on the backend, which is then not clean for anyone
else: the broker must hear so and replace it. Either way the statement raises, and the connection
and the pool work afterwards.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from broker_process import needs_claims
from pgreuse.client import claims, hot
from pgreuse.wire.states import CloseReason, SlotState

pytestmark = needs_claims


def _failing_dup2(monkeypatch: pytest.MonkeyPatch, *, fail_when: Any) -> list[tuple[int, int]]:
    """Make the swaps' ``dup2`` raise EMFILE once, on the first call ``fail_when(src, dst)`` picks."""
    calls: list[tuple[int, int]] = []
    real = os.dup2

    def dup2(src: int, dst: int, inheritable: bool = True) -> int:
        if not calls and fail_when(src, dst):
            calls.append((src, dst))
            raise OSError(errno.EMFILE, "Too many open files (planted)")
        return real(src, dst, inheritable)

    monkeypatch.setattr(claims, "_dup2", dup2)
    return calls


def _closed_fd() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


def test_a_failed_swap_in_gives_the_slot_back_as_it_was(broker, monkeypatch, lease_path):
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 1")  # (the parking connection's first claim is done)
        before = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="the first lease back")
        home = conn._home
        calls = _failing_dup2(monkeypatch, fail_when=lambda src, dst: src != home)
        fds = conn._channel._fds
        saved = list(fds)
        if lease_path == "c":
            # The C hot path calls dup3 itself: every cached backend fd is a closed number now.
            fds[:] = [_closed_fd() + 100_000 if fd >= 0 else fd for fd in fds]  # (EBADF)
        try:
            with pytest.raises(OSError, match="planted" if lease_path == "python" else "Bad file"):
                conn.execute("select 2")
        finally:
            fds[:] = saved
        assert calls or lease_path == "c", "the swap-in's dup2 was not reached"
        after = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="the slot back")
        # The same backends, none replaced: nothing was sent on the one claimed.
        assert [s.backend_pid for s in after.slots] == [s.backend_pid for s in before.slots]
        assert conn.lease is None
        assert conn.execute("select 3").fetchone() == (3,)  # and the connection goes on


def test_a_failed_swap_out_reports_the_backend_broken(broker, monkeypatch, lease_path):
    # (With the C hot path, its own swap-out fails first, on a home number that names nothing, and
    # the Python path takes the end over: it is the one that reports.)
    with broker.connect(autocommit=True) as conn:
        conn.execute("select 1")
        before = broker.wait_for(lambda s: s.count(SlotState.LENT) == 0, what="the first lease back")
        home = conn._home
        calls = _failing_dup2(monkeypatch, fail_when=lambda src, dst: src == home)
        if lease_path == "c":
            conn._home = _closed_fd() + 100_000  # (past any fd this process has: EBADF)
            conn._hot = hot.for_connection(conn, conn._channel)
            conn._home = home
        pid = 0
        with pytest.raises(OSError, match="planted"), conn.transaction():  # (fails at its COMMIT)
            (pid,) = conn.execute("select pg_backend_pid()").fetchone()
        assert calls, "the swap-out's dup2 was not reached"
        assert pid in {s.backend_pid for s in before.slots}
        assert conn.lease is None
        # libpq's fd was still on that backend: the broker closes it and opens another.
        reported = CloseReason.CLIENT_REPORTED_BROKEN.name.lower()
        after = broker.wait_for(
            lambda s: (
                s.closed_by_reason.get(reported, 0) > before.closed_by_reason.get(reported, 0)
                and s.count(SlotState.LENT) == 0
            ),
            what="the backend closed as reported broken",
        )
        (gone,) = [s for s in after.slots if s.backend_pid == pid]
        assert (gone.state, gone.close_reason) == (SlotState.CLOSED, CloseReason.CLIENT_REPORTED_BROKEN)
        broker.wait_for(lambda s: s.count(SlotState.IDLE) >= 1, what="a backend to lend again")
        assert conn.execute("select 4").fetchone() == (4,)  # the next claim swaps a good one in
        with broker.connect(autocommit=True) as other:
            assert other.execute("select 5").fetchone() == (5,)
