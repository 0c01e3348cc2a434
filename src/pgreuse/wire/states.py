"""Slot states and the one transition function.

A slot is one place in the pool for one backend connection. Its state says who may touch the backend's
socket: the broker (``connecting``, ``idle``, ``resetting``), exactly one holder (``lent``), or
nobody (``closed``). ``shared`` is the broker's word for a slot it handed to the shared-memory table:
there it is idle for any worker to claim, or lent to the worker that did, and only the slot word
(:mod:`pgreuse.slots`) says which; the broker takes it back with a compare-and-swap.

Like PgBouncer's ``change_server_state()``, :func:`check_transition` is the only gate a state change
goes through, so an impossible change is an internal error and never a silent corruption of the
pool.
"""

from __future__ import annotations

import enum


class SlotState(enum.IntEnum):
    CLOSED = 0  # no backend (initial state too: a slot starts empty)
    CONNECTING = 1
    IDLE = 2
    LENT = 3
    RESETTING = 4
    SHARED = 5  # the broker's view only: the table owns it (never in a slot word)


TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    SlotState.CLOSED: frozenset({SlotState.CONNECTING}),
    SlotState.CONNECTING: frozenset({SlotState.IDLE, SlotState.CLOSED}),
    SlotState.IDLE: frozenset({SlotState.LENT, SlotState.RESETTING, SlotState.CLOSED, SlotState.SHARED}),
    SlotState.LENT: frozenset({SlotState.RESETTING, SlotState.CLOSED}),
    SlotState.RESETTING: frozenset({SlotState.IDLE, SlotState.CLOSED}),
    # taken back: idle (for the proxy, a check), a worker's dirty end, or closed
    SlotState.SHARED: frozenset({SlotState.IDLE, SlotState.RESETTING, SlotState.CLOSED}),
}


class CloseReason(enum.IntEnum):
    """Why a backend was closed; counted per reason in the shared-memory table."""

    NONE = 0
    CONNECT_FAILED = 1
    HOLDER_EXITED = 2  # the holder process died (or closed its control channel) holding the lease
    CLIENT_REPORTED_BROKEN = 3
    SERVER_CLOSED = 4  # EOF or an unexpected message while idle in the broker
    DIED_WHILE_LENT = 5  # the peer hung up while a holder had it (idle-in-transaction timeout, kill)
    UNREAD_DATA = 6  # data waiting on a backend returned as clean: protocol state unknown
    RESET_FAILED = 7
    PARAMETER_MISMATCH = 8  # a new backend reported encoding-relevant parameters unlike the pool's
    SHUTDOWN = 9
    REVOKED = 10  # held longer than --max-lease-time: taken back with shutdown()
    MAX_LIFETIME = 11  # open longer than --max-lifetime: closed while idle, and replaced
    MAX_IDLE = 12  # unused longer than --max-idle, above --min-size: closed while idle
    POOL_SHRUNK = 13  # above a --max-size lowered by a reload: closed while idle


class InvalidTransition(RuntimeError):
    """A slot was asked to make a state change the state machine does not allow (a pgreuse bug)."""


def check_transition(index: int, old: SlotState, new: SlotState, reason: str) -> None:
    """Raise :class:`InvalidTransition` unless ``old -> new`` is allowed."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"slot {index}: {old.name} -> {new.name} is not allowed ({reason})")
