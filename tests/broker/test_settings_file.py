"""--config-file and what a reload applies: the file's keys and types, the command line's
precedence, and the plan of a reload (pure: no server)."""

from __future__ import annotations

import pytest

from pgreuse.broker.config import BrokerConfig, ConfigError
from pgreuse.broker.reload import RELOADABLE, plan
from pgreuse.broker.settings_file import SettingsSource, read_settings, write_settings


def _file(tmp_path, text: str) -> str:
    path = tmp_path / "pgreuse.toml"
    path.write_text(text)
    return str(path)


def test_the_file_gives_settings_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("PGREUSE_DSN", raising=False)
    path = _file(tmp_path, 'dsn = "host=/x dbname=app"\nmax-size = 7\nmin_size = 2\nwait-timeout = 3\n'
                 'log-level = "debug"\n')  # fmt: skip
    source = SettingsSource.from_argv(["--config-file", path, "--max-size", "9"])
    config, notes = source.load_with_notes()
    assert (config.dsn, config.max_size, config.min_size) == ("host=/x dbname=app", 9, 2)
    assert config.wait_timeout == 3.0 and isinstance(config.wait_timeout, float)
    assert config.log_level == "DEBUG"
    assert config.config_file == path
    assert notes == [f"max-size = 7 in {path} is overridden by the command line's --max-size 9"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-size = 'ten'\n", "max-size = 'ten' is a str, and max-size takes a int"),
        ("max-size = true\n", "max-size = True is a bool"),
        ("reset-every-lease = 1\n", "reset-every-lease takes a bool"),
        ("maxsize = 3\n", "unknown setting 'maxsize'"),
        ("config-file = '/x'\n", "unknown setting 'config-file'"),
        ("max-size = \n", "is not valid TOML"),
    ],
)
def test_a_bad_file_names_the_file_the_key_and_the_value(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError, match=r"pgreuse\.toml") as info:
        read_settings(path)
    assert message in str(info.value)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        SettingsSource.from_argv(["--config-file", str(tmp_path / "nope.toml"), "--dsn", "host=/x"]).load()


def test_a_bad_value_in_the_file_names_the_flag_and_the_file(tmp_path):
    path = _file(tmp_path, "max-size = 0\n")
    with pytest.raises(ConfigError, match=r"--max-size 0 .* \(settings from .*pgreuse.toml"):
        SettingsSource.from_argv(["--config-file", path, "--dsn", "host=/x"]).load()


def test_written_settings_read_back(tmp_path):
    path = str(tmp_path / "s.toml")
    values = {"dsn": 'host=/x dbname="a b"\\', "max_size": 3, "wait_timeout": 1.5, "no_handoff": True}
    write_settings(path, values)
    assert read_settings(path) == values


OLD = BrokerConfig(dsn="host=/x dbname=app", max_size=4, min_size=1)


def test_a_reload_applies_sizes_and_timeouts_and_keeps_what_needs_a_restart():
    new = BrokerConfig(dsn="host=/y dbname=app", max_size=2, min_size=2, wait_timeout=5.0,
                       port=7000, max_client_conn=9, log_level="DEBUG")  # fmt: skip
    p = plan(OLD, new, capacity=4)
    assert (p.config.max_size, p.config.min_size, p.config.wait_timeout) == (2, 2, 5.0)
    assert (p.config.max_client_conn, p.config.log_level) == (9, "DEBUG")
    assert (p.config.port, p.config.dsn) == (OLD.port, OLD.dsn)
    assert {name for name, _, _ in p.changed} == {"max_size", "min_size", "wait_timeout",
                                                  "max_client_conn", "log_level"}  # fmt: skip
    assert any("--port changed from 6432 to 7000: it needs a restart" in k for k in p.kept)
    dsn_note = next(k for k in p.kept if k.startswith("--dsn"))
    assert "host=/y" not in dsn_note  # (a DSN may hold a password)


def test_a_reload_cannot_grow_past_the_table():
    p = plan(OLD, BrokerConfig(dsn=OLD.dsn, max_size=6), capacity=4)
    assert p.config.max_size == 4
    assert "more than the 4 slots" in p.kept[0] and "needs a restart" in p.kept[0]
    # Growing back up to the table's slots is fine.
    assert plan(BrokerConfig(dsn=OLD.dsn, max_size=2), OLD, capacity=4).config.max_size == 4


def test_settings_that_do_not_go_together_change_nothing():
    with pytest.raises(ConfigError, match=r"--min-size 5 .*nothing was applied"):
        plan(OLD, BrokerConfig(dsn=OLD.dsn, max_size=6, min_size=5), capacity=4)


def test_what_reloads_is_a_setting():
    assert {f.name for f in BrokerConfig.__attrs_attrs__} >= RELOADABLE
