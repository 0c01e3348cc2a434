"""pgbench through the proxy: both built-in scripts, simple and extended protocol, no errors."""

from __future__ import annotations

import os
import subprocess

import pytest

from pgreuse.devcluster import find_pg_bindir

PGBENCH = os.path.join(find_pg_bindir(), "pgbench")


@pytest.fixture(scope="module")
def pgbench_db(pg):  # type: ignore[no-untyped-def]
    subprocess.run([PGBENCH, "-i", "-q", "-s", "1", pg.dsn()], check=True, capture_output=True, timeout=60)
    return pg


@pytest.mark.parametrize("mode", ["simple", "extended"])
@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
def test_pgbench(pgbench_db, make_broker, mode, script):
    b = make_broker("--max-size", "3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    args = [PGBENCH, "-h", b.socket_dir, "-p", str(b.port), "-U", "postgres", "-n"]
    args += ["-c", "4", "-j", "2", "-t", "50", "-M", mode, "-b", script, b.dbname]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 200/200" in out.stdout
    assert "number of failed transactions: 0" in out.stdout
