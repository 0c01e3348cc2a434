"""BackendStartup driven by scripted server bytes: no sockets."""

from __future__ import annotations

import struct

import pytest
import scramp  # type: ignore[import-untyped]  # scramp ships no type information

from pgreuse.wire import frames
from pgreuse.wire.auth import AuthError, md5_password
from pgreuse.wire.frames import FrameReader, Message, ProtocolError, StartupReader
from pgreuse.wire.startup import BackendStartup, StartupFailed

PARAMS = {"user": "app", "database": "appdb", "application_name": "t"}


def auth(code: int, payload: bytes = b"") -> bytes:
    return frames.frame(b"R", struct.pack("!i", code) + payload)


def after_auth(status: bytes = b"I") -> bytes:
    return (
        frames.parameter_status("server_version", "17.0")
        + frames.parameter_status("client_encoding", "UTF8")
        + frames.notice_response("00000", "welcome")
        + frames.backend_key_data(777, 0xCAFEBABE)
        + frames.ready_for_query(status)
    )


def client_messages(data: bytes) -> list[Message]:
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    assert reader.buffered == 0
    return out


def feed_bytewise(startup: BackendStartup, data: bytes) -> bytes:
    return b"".join(startup.feed(data[i : i + 1]) for i in range(len(data)))


def check_ready(startup: BackendStartup) -> None:
    assert startup.done
    assert startup.parameters == {"server_version": "17.0", "client_encoding": "UTF8"}
    assert (startup.backend_pid, startup.backend_secret) == (777, 0xCAFEBABE)
    assert startup.transaction_status == b"I"
    assert [n.message for n in startup.notices] == ["welcome"]
    assert startup.leftover() == b""


def test_initial_bytes_is_startup_message() -> None:
    reader = StartupReader()
    reader.feed(BackendStartup(PARAMS, None).initial_bytes())
    packet = reader.next_packet()
    assert packet == frames.StartupMessage(3, 0, PARAMS)


def test_user_required() -> None:
    with pytest.raises(ValueError, match="user"):
        BackendStartup({"database": "x"}, None)


def test_trust_byte_by_byte() -> None:
    startup = BackendStartup(PARAMS, None)
    assert feed_bytewise(startup, auth(0) + after_auth()) == b""
    check_ready(startup)
    assert startup.auth_method == "trust"


def test_leftover_after_ready_for_query() -> None:
    startup = BackendStartup(PARAMS, None)
    startup.feed(auth(0) + after_auth() + frames.notice_response("00000", "late"))
    check_ready_leftover = startup.leftover()
    assert check_ready_leftover == frames.notice_response("00000", "late")


def test_cleartext_password() -> None:
    startup = BackendStartup(PARAMS, "s3cret")
    reply = startup.feed(auth(3))
    assert client_messages(reply) == [Message(b"p", b"s3cret\0")]
    assert not startup.done
    assert startup.feed(auth(0) + after_auth()) == b""
    check_ready(startup)
    assert startup.auth_method == "password"


def test_md5_password() -> None:
    startup = BackendStartup(PARAMS, "s3cret")
    reply = feed_bytewise(startup, auth(5, b"salt"))
    assert client_messages(reply) == [Message(b"p", md5_password("app", "s3cret", b"salt") + b"\0")]
    startup.feed(auth(0) + after_auth())
    check_ready(startup)


@pytest.mark.parametrize("code", [3, 5, 10])
def test_password_needed_but_missing(code: int) -> None:
    startup = BackendStartup(PARAMS, None)
    payload = {3: b"", 5: b"salt", 10: b"SCRAM-SHA-256\0\0"}[code]
    with pytest.raises(AuthError, match=r"for user 'app' .* none was given: put password=.*PGPASSWORD"):
        startup.feed(auth(code, payload))


def scram_server(password: str) -> scramp.ScramServer:
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    info = mech.make_auth_info(password, iteration_count=4096)
    return mech.make_server(lambda _user: info)


def parse_initial_response(msg: Message) -> tuple[str, bytes]:
    name, pos = frames.read_cstring(msg.body, 0)
    (length,) = struct.unpack_from("!i", msg.body, pos)
    data = msg.body[pos + 4 :]
    assert len(data) == length
    return name.decode(), data


def test_scram_sha_256() -> None:
    server = scram_server("pencil")
    startup = BackendStartup(PARAMS, "pencil")
    reply = startup.feed(auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))
    [initial] = client_messages(reply)
    mechanism, client_first = parse_initial_response(initial)
    assert mechanism == "SCRAM-SHA-256"
    server.set_client_first(client_first.decode())
    reply = feed_bytewise(startup, auth(11, server.get_server_first().encode()))
    [final] = client_messages(reply)
    server.set_client_final(final.body.decode())  # raises if the proof is wrong
    assert startup.feed(auth(12, server.get_server_final().encode())) == b""
    assert not startup.done
    startup.feed(auth(0) + after_auth())
    check_ready(startup)
    assert startup.auth_method == "scram-sha-256"


def test_scram_bad_server_signature() -> None:
    server = scram_server("pencil")
    startup = BackendStartup(PARAMS, "pencil")
    [initial] = client_messages(startup.feed(auth(10, b"SCRAM-SHA-256\0\0")))
    server.set_client_first(parse_initial_response(initial)[1].decode())
    startup.feed(auth(11, server.get_server_first().encode()))
    with pytest.raises(AuthError, match="did not prove"):
        startup.feed(auth(12, b"v=" + b"A" * 43 + b"="))


def test_auth_ok_before_scram_finished_is_refused() -> None:
    startup = BackendStartup(PARAMS, "pencil")
    startup.feed(auth(10, b"SCRAM-SHA-256\0\0"))
    with pytest.raises(AuthError, match="before completing SCRAM-SHA-256"):
        startup.feed(auth(0))


def test_only_scram_plus_offered() -> None:
    startup = BackendStartup(PARAMS, "pencil")
    with pytest.raises(AuthError, match=r"\['SCRAM-SHA-256-PLUS'\].*only supports SCRAM-SHA-256"):
        startup.feed(auth(10, b"SCRAM-SHA-256-PLUS\0\0"))


@pytest.mark.parametrize(("code", "name"), [(2, "Kerberos V5"), (7, "GSSAPI"), (9, "SSPI")])
def test_unsupported_methods(code: int, name: str) -> None:
    startup = BackendStartup(PARAMS, "pw")
    with pytest.raises(AuthError, match=f"asks for {name} authentication \\(code {code}\\)"):
        startup.feed(auth(code))


def test_unknown_method() -> None:
    with pytest.raises(AuthError, match="unknown authentication method code 42"):
        BackendStartup(PARAMS, "pw").feed(auth(42))


def test_error_response_during_auth() -> None:
    startup = BackendStartup(PARAMS, "wrong")
    startup.feed(auth(5, b"salt"))
    error = frames.error_response("28P01", 'password authentication failed for user "app"', severity="FATAL")
    with pytest.raises(StartupFailed) as info:
        feed_bytewise(startup, error)
    assert info.value.fields.sqlstate == "28P01"
    assert str(info.value) == ('FATAL:  password authentication failed for user "app" (SQLSTATE 28P01)')


def test_error_response_after_auth() -> None:
    startup = BackendStartup(PARAMS, None)
    error = frames.error_response("53300", "sorry, too many clients already", severity="FATAL")
    with pytest.raises(StartupFailed, match="53300"):
        startup.feed(auth(0) + error)


def test_negotiate_protocol_version() -> None:
    startup = BackendStartup(PARAMS, None)
    startup.feed(frames.negotiate_protocol_version(0, ["_pq_.x"]) + auth(0) + after_auth())
    check_ready(startup)
    startup = BackendStartup(PARAMS, None)
    body = struct.pack("!ii", 4 << 16, 0)
    with pytest.raises(ProtocolError, match=r"negotiated protocol 4\.0"):
        startup.feed(frames.frame(b"v", body))


def test_out_of_order_messages() -> None:
    with pytest.raises(ProtocolError, match=r"unexpected message type b'Z'"):
        BackendStartup(PARAMS, None).feed(frames.ready_for_query(b"I"))
    with pytest.raises(ProtocolError, match=r"unexpected message type b'R'"):
        BackendStartup(PARAMS, None).feed(auth(0) + auth(0))
    with pytest.raises(ProtocolError, match="unexpected authentication request 11"):
        BackendStartup(PARAMS, "pw").feed(auth(3) + auth(11, b"x"))
    with pytest.raises(ProtocolError, match="invalid status"):
        BackendStartup(PARAMS, None).feed(auth(0) + frames.frame(b"Z", b"Q"))


def test_bad_frame_from_server() -> None:
    with pytest.raises(ProtocolError, match="invalid length 2"):
        BackendStartup(PARAMS, None).feed(b"R\0\0\0\x02")
