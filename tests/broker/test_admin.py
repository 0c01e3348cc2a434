"""The admin console (database ``pgreuse`` on the broker's listener), from psql and psycopg."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psycopg
import pytest

PSQL = "/usr/bin/psql"


def test_psql_show_commands(broker):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    args = [PSQL, "-X", "-h", broker.socket_dir, "-p", str(broker.port), "pgreuse"]
    for cmd in ("SHOW POOLS", "show stats", "SHOW CLIENTS", "SHOW SERVERS", "SHOW CONFIG", "SHOW VERSION"):
        args += ["-c", cmd]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert out.returncode == 0, out.stderr
    for column in ("cl_active", "sv_idle", "total_xact_count", "connect_time", "remote_pid", "changeable"):
        assert column in out.stdout
    assert "pgreuse 0" in out.stdout


def test_rows_reflect_the_pool(broker):
    with broker.console() as admin, psycopg.connect(broker.conninfo) as client:
        client.execute("select 1")  # a proxied client inside a transaction: holds a backend
        (pools,) = admin.execute("SHOW POOLS").fetchall()
        assert pools["database"] == broker.dbname
        assert pools["sv_active"] == 1
        assert pools["cl_active"] == 1
        assert pools["pool_mode"] == "transaction"
        (active,) = [c for c in admin.execute("SHOW CLIENTS").fetchall() if c["state"] == "active"]
        assert active["mode"] == "proxy"
        (server,) = [s for s in admin.execute("SHOW SERVERS").fetchall() if s["state"] == "active"]
        assert server["remote_pid"] == active["server_pid"]
        (pid,) = client.execute("select pg_backend_pid()").fetchone()  # type: ignore[misc]
        assert server["remote_pid"] == pid
        assert server["holder"] == "proxy"
        client.commit()
        (stats,) = admin.execute("SHOW STATS").fetchall()
        assert stats["total_xact_count"] >= 1
        assert stats["total_query_count"] >= 3
        config = {r["key"]: r["value"] for r in admin.execute("SHOW CONFIG").fetchall()}
        assert config["max-size"] == "2"
        assert config["pool-mode"] == "transaction"


def test_pause_resume(broker):
    with broker.console() as admin, psycopg.connect(broker.conninfo, autocommit=True) as client:
        admin.execute("PAUSE")
        assert admin.execute("SHOW POOLS").fetchone()["paused"] == 1  # type: ignore[index]
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(client.execute("select 5").fetchone()))
        t.start()
        time.sleep(0.3)
        assert not result  # queued while paused
        assert admin.execute("SHOW POOLS").fetchone()["cl_waiting"] == 1  # type: ignore[index]
        admin.execute("RESUME")
        t.join(10)
        assert result == [(5,)]


def test_unknown_command_errors_and_the_session_goes_on(broker):
    with broker.console() as admin:
        with pytest.raises(psycopg.errors.SyntaxError, match="SHOW HELP"):
            admin.execute("SHOW NONSENSE")
        admin.execute("RELOAD")
        assert admin.execute("SHOW VERSION").fetchone() is not None


def test_shutdown_stops_the_broker(make_broker):
    b = make_broker()
    with b.console() as admin:
        admin.execute("SHUTDOWN")
    assert b.proc is not None
    assert b.proc.wait(20) == 0
