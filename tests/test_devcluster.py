"""The throwaway cluster is what the rest of the suite assumes: reachable, with its roles."""

from __future__ import annotations

import os

import psycopg
import pytest

from pgreuse.devcluster import PASSWORD_ROLES, DevCluster


def _select_one(conninfo: str) -> int:
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute("select 1").fetchone()
    assert row is not None
    return int(row[0])


def test_unix_socket(pg: DevCluster) -> None:
    assert _select_one(pg.dsn()) == 1


def test_unix_socket_path_is_short(pg: DevCluster) -> None:
    if pg.socket_dir is None:
        pytest.skip("PGREUSE_TEST_DSN names a TCP server")
    assert len(f"{pg.socket_dir}/.s.PGSQL.{pg.port}") < 80


def test_tcp(pg: DevCluster) -> None:
    with psycopg.connect(pg.tcp_dsn(), connect_timeout=10) as conn:
        row = conn.execute("select inet_server_addr()::text, current_database()").fetchone()
    assert row == ("127.0.0.1/32", "pgreuse_test")


@pytest.mark.parametrize("role", sorted(PASSWORD_ROLES))
def test_password_roles(pg: DevCluster, role: str) -> None:
    password = PASSWORD_ROLES[role][0]
    with psycopg.connect(pg.tcp_dsn(user=role, password=password), connect_timeout=10) as conn:
        row = conn.execute("select current_user, current_database()").fetchone()
        assert row == (role, "pgreuse_test")
        # The grants on schema public (PG15 no longer gives them to everyone).
        with conn.transaction(force_rollback=True):
            conn.execute("create table public.devcluster_probe (id int)")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.tcp_dsn(user=role, password="wrong"), connect_timeout=10)


def test_password_roles_use_their_method(pg: DevCluster) -> None:
    # The stored form decides which pg_hba methods can verify it: md5 needs an md5 hash.
    query = """
        select rolname, case when rolpassword like 'md5%%' then 'md5'
                             else split_part(rolpassword, '$', 1) end
        from pg_authid where rolname = any(%s)
    """
    with psycopg.connect(pg.dsn()) as conn:
        stored = set(conn.execute(query, [list(PASSWORD_ROLES)]).fetchall())
    assert stored == {
        ("md5user", "md5"),
        ("scramuser", "SCRAM-SHA-256"),
        ("pwuser", "SCRAM-SHA-256"),
    }


def test_restart_breaks_old_connections(pg_private: DevCluster) -> None:
    with psycopg.connect(pg_private.dsn()) as before:
        before.execute("select 1")
        pg_private.restart()
        with pytest.raises(psycopg.OperationalError):
            before.execute("select 1")
        assert before.broken
    assert _select_one(pg_private.dsn()) == 1
    assert _select_one(pg_private.tcp_dsn(user="scramuser", password="scrampass")) == 1


def test_stop_and_destroy_are_idempotent(pg_private: DevCluster) -> None:
    pg_private.stop()
    pg_private.stop()
    assert not pg_private.is_running()
    pg_private.start()
    assert _select_one(pg_private.dsn()) == 1
    pg_private.destroy()
    pg_private.destroy()


def test_max_connections() -> None:
    with DevCluster.create(max_connections=17, extra_conf={"work_mem": "8MB"}) as cluster:
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("show max_connections").fetchone() == ("17",)
            assert conn.execute("show work_mem").fetchone() == ("8MB",)
        datadir, socket_dir = cluster.datadir, cluster.socket_dir
    assert not os.path.exists(datadir)
    assert not os.path.exists(socket_dir)
