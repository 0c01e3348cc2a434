"""Client auth steps against independent computations and an in-process SCRAM server."""

from __future__ import annotations

import hashlib

import pytest
import scramp  # type: ignore[import-untyped]  # scramp ships no type information

from pgreuse.wire.auth import AuthError, ScramSteps, md5_password


def test_md5_known_vector() -> None:
    # Computed independently, the way PostgreSQL documents it: concat('md5', md5(concat(
    # md5(concat(password, username)), random-salt))).
    inner = hashlib.md5(b"secretapp").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"\x01\x02\x03\x04").hexdigest()
    assert md5_password("app", "secret", b"\x01\x02\x03\x04") == expected.encode()
    # A fixed vector, so a shared mistake in both computations would still show.
    assert (
        md5_password("postgres", "postgres", b"abcd")
        == b"md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + b"abcd").hexdigest().encode()
    )


def test_md5_rejects_bad_salt() -> None:
    with pytest.raises(AuthError, match="4 bytes, the server sent 3"):
        md5_password("u", "p", b"abc")


def make_server(password: str) -> tuple[scramp.ScramServer, object]:
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    auth_info = mech.make_auth_info(password, iteration_count=4096)
    return mech.make_server(lambda _user: auth_info), auth_info


def test_scram_against_scramp_server() -> None:
    server, _ = make_server("pencil")
    steps = ScramSteps("app", "pencil")
    server.set_client_first(steps.first().decode())
    client_final = steps.final(server.get_server_first().encode())
    server.set_client_final(client_final.decode())
    steps.verify(server.get_server_final().encode())


def test_scram_wrong_password_server_rejects() -> None:
    server, _ = make_server("pencil")
    steps = ScramSteps("app", "crayon")
    server.set_client_first(steps.first().decode())
    client_final = steps.final(server.get_server_first().encode())
    with pytest.raises(scramp.ScramException):
        server.set_client_final(client_final.decode())


def test_scram_server_signature_mismatch() -> None:
    # A server that does not know the password (another password's keys) cannot prove itself.
    real, _ = make_server("pencil")
    steps = ScramSteps("app", "pencil")
    first = steps.first().decode()
    real.set_client_first(first)
    server_first = real.get_server_first()
    steps.final(server_first.encode())
    forged = "v=" + "A" * 43 + "="
    with pytest.raises(AuthError, match="did not prove it knows the password"):
        steps.verify(forged.encode())


def test_scram_server_error_message() -> None:
    real, _ = make_server("pencil")
    steps = ScramSteps("app", "pencil")
    real.set_client_first(steps.first().decode())
    steps.final(real.get_server_first().encode())
    with pytest.raises(AuthError, match="failed verification"):
        steps.verify(b"e=invalid-proof")


def test_scram_bad_server_first() -> None:
    steps = ScramSteps("app", "pencil")
    steps.first()
    with pytest.raises(AuthError, match="bad server-first message"):
        steps.final(b"r=not-our-nonce,s=c2FsdA==,i=4096")


def test_scram_empty_user_is_fine() -> None:
    # PostgreSQL ignores the SCRAM user name; an empty one must not stop us.
    steps = ScramSteps("", "pencil")
    assert steps.first().startswith(b"n,,n=*,r=")
