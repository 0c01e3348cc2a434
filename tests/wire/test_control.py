"""Control messages: every message survives encode/decode; bad packets name what is wrong."""

from __future__ import annotations

import pytest

from pgreuse.wire import control

MESSAGES = [
    control.Hello(control.VERSION, 1234),
    control.Welcome(control.VERSION, 99, 10),
    control.Welcome(control.VERSION, 99, 10, proxy_only=True),
    control.Welcome(control.VERSION, 99, 10, holder=2**32 - 1),
    control.Deny(7, control.DenyCode.TIMEOUT, "no backend free within 30s"),
    control.Fd(3, 2**32 - 1, 4321),
    control.Want(3),
    control.Poke(),
    control.Release(3, 12, control.Outcome.DIRTY),
    control.Dirty((1 << 30) + 5),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: control.Message) -> None:
    assert control.decode(control.encode(msg)) == msg


def test_version_1_welcome_is_refused_as_malformed() -> None:
    # A version-1 broker's Welcome has no proxy_only byte: never read it as "handoff allowed".
    with pytest.raises(control.ControlError, match="malformed control message b'W'"):
        control.decode(b"W" + (1).to_bytes(2, "big") + (99).to_bytes(4, "big") + (10).to_bytes(4, "big"))
