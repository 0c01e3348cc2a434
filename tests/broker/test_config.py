"""Broker settings: the command line rebuilds every field, and bad values name the flag. No server."""

from __future__ import annotations

import pytest

from pgreuse.broker.config import BrokerConfig, ConfigError
from pgreuse.broker.settings_file import parse_argv


def test_to_argv_rebuilds_every_setting():
    config = BrokerConfig(
        dsn="host=/x dbname=app", socket_dir="/run/pgr", port=7000, max_size=7, min_size=2,
        wait_timeout=1.5, idle_transaction_timeout=3.0, shutdown_timeout=4.0, log_level="DEBUG",
        parent_pid=42, pool_mode="session", max_client_conn=50, listen_addr="127.0.0.1:7001",
        reset_query="RESET ALL", reset_every_lease=True, max_waiting=9, max_lease_time=60.0,
        client_login_timeout=7.5,
    )  # fmt: skip
    rebuilt, supervised = parse_argv([*config.to_argv(), "--dsn", config.dsn])
    assert rebuilt == config
    assert not supervised
    assert "--dsn" not in config.to_argv()  # a password in the DSN never reaches `ps`


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-size", "0"], "--max-size 0"),
        (["--min-size", "5", "--max-size", "2"], "--min-size 5"),
        (["--max-lease-time", "-1"], "--max-lease-time -1"),
        (["--max-waiting", "-3"], "--max-waiting -3"),
        (["--max-waiting", str(2**63)], f"--max-waiting {2**63}"),
        (["--wait-timeout", "0"], "--wait-timeout 0"),
        (["--wait-timeout", "inf"], "--wait-timeout inf"),
        (["--wait-timeout", "1e10"], "--wait-timeout 10000000000.0 .* at most 31536000"),
        (["--socket-dir", "relative"], "--socket-dir 'relative'"),
        (["--client-login-timeout", "-1"], "--client-login-timeout -1"),
        (["--client-login-timeout", "nan"], "--client-login-timeout nan"),
    ],
)
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_argv(["--dsn", "host=/x", *argv])
