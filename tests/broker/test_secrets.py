"""The backend password never shows (issue #13, access control): not in the broker's log at any level,
not in the admin console's SHOW CONFIG, not on its command line (what ps shows), not in the shared
table, not in a client's error when PostgreSQL refuses the password."""

from __future__ import annotations

import glob
import os
import time

import psycopg
import pytest

from pgreuse.broker.config import ConfigError
from pgreuse.broker.settings_file import parse_argv
from pgreuse.shm import table_path

PASSWORD = "md5pass"  # the DevCluster's md5user, over TCP


def test_the_backend_password_never_shows(make_broker, pg):
    broker = make_broker(
        "--max-size", "2", "--log-level", "DEBUG", dsn=pg.tcp_dsn(user="md5user", password=PASSWORD)
    )
    with broker.connect(autocommit=True) as conn:
        assert conn.execute("select current_user").fetchone() == ("md5user",)
        with broker.console() as admin:
            shown = repr(admin.execute("show config").fetchall())
        assert "md5user" in shown or "dsn" in shown.lower()  # (the config is there, without its secret)
        assert PASSWORD not in shown
    with open(f"/proc/{broker.proc.pid}/cmdline", "rb") as f:
        assert PASSWORD.encode() not in f.read()  # (the Gunicorn hook passes it in the environment)
    with open(table_path(broker.socket_dir, broker.port), "rb") as f:
        assert PASSWORD.encode() not in f.read()
    time.sleep(0.3)
    assert PASSWORD not in broker.log()


def test_a_refused_password_is_not_echoed(make_broker, pg):
    wrong = "not-the-password-4711"
    broker = make_broker(
        "--max-size", "1", "--log-level", "DEBUG", dsn=pg.tcp_dsn(user="md5user", password=wrong)
    )
    with pytest.raises(psycopg.OperationalError) as info:
        broker.connect(autocommit=True).execute("select 1")
    assert wrong not in str(info.value)
    assert "password authentication failed" in str(info.value) or "cannot reach PostgreSQL" in str(info.value)
    assert wrong not in broker.log()
    for path in glob.glob(os.path.join(broker.socket_dir, "*")):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert wrong.encode() not in f.read(), path


@pytest.mark.parametrize("dsn", ["host=/tmp user=app password=s3cret", "postgresql://app:s3cret@db/app"])
def test_a_password_on_the_command_line_is_refused(dsn, monkeypatch):
    monkeypatch.delenv("PGREUSE_DSN", raising=False)
    with pytest.raises(ConfigError, match=r"--dsn holds a password.*PGREUSE_DSN") as info:
        parse_argv(["--dsn", dsn])
    assert "s3cret" not in str(info.value)
    monkeypatch.setenv("PGREUSE_DSN", dsn)  # the environment is where it belongs
    config, _ = parse_argv([])
    assert config.dsn == dsn
