"""The startup answer encoded once per pool: the same bytes as each message encoded anew."""

from __future__ import annotations

from pgreuse.broker.greeting import Greeting, ParkingSecrets
from pgreuse.wire import frames


def _encoded_anew(params: dict[str, str], app: str, key: int, secret: int, negotiate: bytes) -> bytes:
    out = [negotiate, frames.auth_ok()]
    out += [frames.parameter_status(k, app if k == "application_name" else v) for k, v in params.items()]
    out += [frames.backend_key_data(key, secret), frames.ready_for_query(b"I")]
    return b"".join(out)


def test_the_reply_is_the_messages_encoded_anew() -> None:
    params = {"server_version": "15.4", "application_name": "", "TimeZone": "UTC", "DateStyle": "ISO, MDY"}
    greeting = Greeting()
    negotiate = frames.negotiate_protocol_version(0, ["_pq_.x"])
    for app, key, neg in (("web", 1 << 30 | 1, b""), ("", 1 << 30 | 2, negotiate), ("é", 7, b"")):
        assert greeting.reply(params, app, key, 12345, neg) == _encoded_anew(params, app, key, 12345, neg)


def test_a_pool_without_application_name_shows_none() -> None:
    params = {"server_version": "15.4", "TimeZone": "UTC"}
    assert Greeting().reply(params, "web", 5, 6) == _encoded_anew(params, "web", 5, 6, b"")


def test_other_parameters_are_encoded_anew() -> None:
    # Cached per parameters dict: a new dict (another pool's, or a test's) is never answered with
    # the old one's bytes.
    greeting = Greeting()
    first = {"server_version": "15.4", "application_name": ""}
    second = {"server_version": "16.1", "application_name": "", "TimeZone": "UTC"}
    assert greeting.reply(first, "a", 1, 2) == _encoded_anew(first, "a", 1, 2, b"")
    assert greeting.reply(second, "a", 1, 2) == _encoded_anew(second, "a", 1, 2, b"")
    assert greeting.reply(first, "a", 1, 2) == _encoded_anew(first, "a", 1, 2, b"")


def test_parking_secrets_are_31_bit_and_refill() -> None:
    secrets = ParkingSecrets(block=8)  # two secrets per block: the refill is exercised
    drawn = [secrets.next() for _ in range(1000)]
    assert all(0 <= s < 1 << 31 for s in drawn)
    assert len(set(drawn)) > 990  # random, not a repeating block
    assert max(drawn) >= 1 << 30  # the top bit is used
