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


def run_pgbench(b, *extra: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    args = [PGBENCH, "-h", b.socket_dir, "-p", str(b.port), "-U", "postgres", "-n", *extra, b.dbname]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_named_prepared_statements_refused_in_transaction_mode(pgbench_db, make_broker):
    b = make_broker("--max-size", "2")
    out = run_pgbench(b, "-c", "2", "-t", "10", "-M", "prepared", "-b", "select-only")
    assert out.returncode != 0
    # pgbench prepares with PQprepare (Parse + Sync) and reports the broker's answer.
    assert 'ERROR:  pgreuse broker: prepared statement "P_0" cannot be created' in out.stderr, out.stderr
    assert "pgbench -M extended" in out.stderr
    assert "--pool-mode session" in out.stderr
    # The broker is fine afterwards, and its backends too.
    out = run_pgbench(b, "-c", "2", "-t", "10", "-M", "extended", "-b", "select-only")
    assert out.returncode == 0, out.stdout + out.stderr
    assert b.snapshot().counters["protocol_errors"] == 0


def test_named_prepared_statements_work_in_session_mode(pgbench_db, make_broker):
    b = make_broker("--max-size", "3", "--pool-mode", "session")
    out = run_pgbench(b, "-c", "3", "-j", "1", "-t", "50", "-M", "prepared", "-b", "tpcb-like")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 150/150" in out.stdout
    # Sessions that prepared statements leave: their backends are reset, and reused cleanly.
    out = run_pgbench(b, "-c", "3", "-j", "1", "-t", "20", "-M", "prepared", "-b", "select-only")
    assert out.returncode == 0, out.stdout + out.stderr
