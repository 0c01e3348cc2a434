"""The one slot state machine: every allowed change, and every other one refused with its reason."""

from __future__ import annotations

import itertools

import pytest

from pgreuse.wire.states import TRANSITIONS, InvalidTransition, SlotState, check_transition

S = SlotState
ALLOWED = {
    (S.CLOSED, S.CONNECTING),
    (S.CONNECTING, S.IDLE),
    (S.CONNECTING, S.CLOSED),
    (S.IDLE, S.LENT),
    (S.IDLE, S.RESETTING),
    (S.IDLE, S.CLOSED),
    (S.LENT, S.RESETTING),
    (S.LENT, S.CLOSED),
    (S.RESETTING, S.IDLE),
    (S.RESETTING, S.CLOSED),
    # shared with the workers through the table, and taken back (pgreuse.broker.sharing)
    (S.IDLE, S.SHARED),
    (S.SHARED, S.IDLE),
    (S.SHARED, S.RESETTING),
    (S.SHARED, S.CLOSED),
}


@pytest.mark.parametrize(("old", "new"), sorted(ALLOWED))
def test_the_lease_cycle_and_closing_are_allowed(old, new):
    check_transition(3, old, new, "test")


@pytest.mark.parametrize(("old", "new"), [p for p in itertools.product(S, S) if p not in ALLOWED])
def test_everything_else_is_refused_naming_slot_states_and_reason(old, new):
    with pytest.raises(InvalidTransition) as info:
        check_transition(3, old, new, "because")
    assert str(info.value) == f"slot 3: {old.name} -> {new.name} is not allowed (because)"


def test_a_lent_backend_never_goes_straight_back_to_idle():
    # Returned backends pass through RESETTING, where the broker proves nothing is left unread.
    assert S.IDLE not in TRANSITIONS[S.LENT]
    # Only the broker reopens a closed slot, and only by connecting a new backend.
    assert TRANSITIONS[S.CLOSED] == {S.CONNECTING}
