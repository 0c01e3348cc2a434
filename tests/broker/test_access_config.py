"""Access settings (issue #13): ``--allow-uid``/``--allow-gid`` and ``--auth-file`` are read and
checked before anything is opened, and every bad value is named with what to do. No server."""

from __future__ import annotations

import os

import pytest

from pgreuse.broker.access import Access, parse_gids, parse_uids
from pgreuse.broker.authfile import load_secrets, read_userlist
from pgreuse.broker.config import BrokerConfig, ConfigError
from pgreuse.broker.settings_file import parse_argv
from pgreuse.gunicorn import config_from_env
from pgreuse.wire.scram_server import ScramSecret

DSN = "host=/x dbname=app"


def test_names_and_numbers_and_lists():
    assert parse_uids("root, 12345,nobody") == {0, 12345, 65534}
    assert parse_gids("nogroup,4242") == {65534, 4242}
    assert parse_uids("") == frozenset()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allow-uid", "no-such-user"], "--allow-uid 'no-such-user': no user named 'no-such-user'"),
        (["--allow-uid", "root", "--allow-uid", "x y"], "--allow-uid 'root,x y': no user named 'x y'"),
        (["--allow-gid", "no-such-group"], "--allow-gid 'no-such-group': no group named"),
        (["--allow-uid", str(2**32)], f"user id {2**32} is out of range"),
        (["--allow-uid", "-1"], "no user named '-1'"),
        (["--listen-addr", "0.0.0.0:6543"], "without --auth-file .* loopback addresses only"),
        (
            ["--auth-file", "/nonexistent/userlist.txt"],
            "--auth-file: '/nonexistent/userlist.txt': cannot read it",
        ),
    ],
)
def test_bad_access_settings_are_refused_at_start(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_argv(["--dsn", DSN, *argv])


def test_repeated_flags_make_one_list_that_to_argv_rebuilds(tmp_path):
    auth = tmp_path / "users"
    auth.write_text('"app" "secret"\n')
    config, _ = parse_argv([
        "--dsn", DSN, "--allow-uid", "nobody", "--allow-uid", "1001,1002", "--allow-gid", "4242",
        "--auth-file", str(auth), "--listen-addr", "0.0.0.0:6543",
    ])  # fmt: skip
    assert (config.allow_uid, config.allow_gid) == ("nobody,1001,1002", "4242")
    rebuilt, _ = parse_argv([*config.to_argv(), "--dsn", DSN])
    assert rebuilt == config


def test_the_gunicorn_hook_reads_them_from_the_environment(monkeypatch):
    monkeypatch.setenv("PGREUSE_DSN", DSN)
    monkeypatch.setenv("PGREUSE_ALLOW_UID", "nobody,1001")
    monkeypatch.setenv("PGREUSE_ALLOW_GID", "4242")
    config = config_from_env()
    assert (config.allow_uid, config.allow_gid) == ("nobody,1001", "4242")
    monkeypatch.setenv("PGREUSE_ALLOW_GID", "no-such-group")
    with pytest.raises(ConfigError, match="--allow-gid 'no-such-group'"):
        config_from_env()


def test_the_directory_and_socket_modes_follow_the_settings():
    nothing = Access()
    assert (nothing.dir_mode(0), nothing.socket_mode) == (0o700, 0o600)
    assert Access(uids=frozenset({0, os.geteuid()})).dir_mode(0) == 0o700  # root and itself: nobody new
    assert (Access(uids=frozenset({65534})).dir_mode(0), Access(uids=frozenset({65534})).socket_mode) == (
        0o711,
        0o666,
    )
    groups = Access(gids=frozenset({4242}))
    assert (groups.dir_mode(4242), groups.dir_mode(0)) == (0o710, 0o711)
    assert Access(uids=frozenset({65534}), gids=frozenset({4242})).dir_mode(4242) == 0o711


def write(tmp_path, text: str) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "userlist.txt"
    path.write_text(text)
    return str(path)


def test_the_userlist_format_of_pgbouncer(tmp_path):
    secret = ScramSecret.from_password("pw", b"s" * 16).encode()
    path = write(tmp_path, f'; comment\n# another\n\n"app" "s3cret"\n  "a""b" "{secret}" ignored\n')
    assert read_userlist(path) == {"app": "s3cret", 'a"b': secret}
    secrets = load_secrets(path)
    assert secrets['a"b'] == ScramSecret.parse(secret)
    assert secrets["app"].iterations == 4096 and len(secrets["app"].salt) == 16


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("app Pw-9x\n", "line 1: the user name must be in double quotes"),
        ('"app" Pw-9x\n', "line 1: the password of user 'app' must be in double quotes"),
        ('"app" "Pw-9x\n', "line 1: the password of user 'app' has no closing double quote"),
        ('"app" "Pw-9x"\n"app" "Pw-9x"\n', "line 2: user 'app' is listed twice"),
        ('"" "Pw-9x"\n', "line 1: the user name is empty"),
        ('"app" ""\n', "line 1: user 'app' has an empty password"),
        ('"app" "md5' + "9" * 32 + '"\n', "line 1: user 'app' has an md5 hash"),
        ('"app" "SCRAM-SHA-256$4096:Pw-9x"\n', "line 1: the secret of user 'app' is malformed"),
    ],
)
def test_a_bad_userlist_names_the_line_and_never_the_password(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        read_userlist(path)
    assert "Pw-9x" not in str(info.value) and "9" * 32 not in str(info.value)
    assert path in str(info.value)
    with pytest.raises(ConfigError, match="--auth-file: "):
        BrokerConfig(dsn=DSN, auth_file=path)
