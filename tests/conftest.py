"""Session-wide fixtures: a real PostgreSQL server, and short directories for Unix sockets.

``pg`` is one throwaway cluster per test process (per xdist worker), or the server named by
``$PGREUSE_TEST_DSN``. Missing PostgreSQL binaries fail the run: a test suite that skips everything
when the server is absent reports green while testing nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import NoReturn

import attrs
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgreuse.devcluster import ClusterError, DevCluster


@attrs.define
class ExternalServer:
    """A server we do not own, named by ``$PGREUSE_TEST_DSN``; same interface as DevCluster.

    It must have the roles and pg_hba rules DevCluster creates (see pgreuse.devcluster).
    """

    conninfo: str
    socket_dir: str | None
    port: int
    superuser: str
    dbname: str

    @classmethod
    def from_dsn(cls, conninfo: str) -> ExternalServer:
        params = conninfo_to_dict(conninfo)
        host = str(params.get("host") or "")
        return cls(
            conninfo=conninfo,
            socket_dir=host if host.startswith("/") else None,
            port=int(str(params.get("port") or 5432)),
            superuser=str(params.get("user") or "postgres"),
            dbname=str(params.get("dbname") or "pgreuse_test"),
        )

    def dsn(self, **overrides: str) -> str:
        return make_conninfo(self.conninfo, **overrides)

    def tcp_dsn(self, **overrides: str) -> str:
        params = {str(k): str(v) for k, v in conninfo_to_dict(self.conninfo).items()}
        if self.socket_dir is not None or not params.get("host"):
            params["host"] = "127.0.0.1"
        params.setdefault("sslmode", "disable")
        params.update(overrides)
        return make_conninfo("", **params)

    def _not_ours(self, what: str) -> NoReturn:
        pytest.fail(
            f"{what} needs a cluster the tests own; PGREUSE_TEST_DSN names an external server "
            f"(use the pg_private fixture, or unset PGREUSE_TEST_DSN)"
        )

    def start(self) -> None:
        self._not_ours("start()")

    def stop(self, mode: str = "fast") -> None:
        self._not_ours("stop()")

    def restart(self) -> None:
        self._not_ours("restart()")

    def wait_ready(self, timeout: float = 30) -> None:
        pass

    def destroy(self) -> None:
        pass


def _create_cluster() -> DevCluster:
    try:
        return DevCluster.create()
    except ClusterError as exc:
        problem = str(exc)
    # Outside the except block, so the report shows the message, not a chained traceback.
    pytest.fail(f"cannot run the tests without a PostgreSQL server: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def pg() -> Iterator[DevCluster | ExternalServer]:
    """The shared PostgreSQL server: do not stop or restart it (use ``pg_private``)."""
    external = os.environ.get("PGREUSE_TEST_DSN")
    if external:
        yield ExternalServer.from_dsn(external)
        return
    cluster = _create_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_private() -> Iterator[DevCluster]:
    """A fresh cluster for this test alone, for destructive tests (restart, stop, kill)."""
    cluster = _create_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A fresh directory with a short path under /tmp, for Unix sockets (107-byte path limit)."""
    path = tempfile.mkdtemp(prefix="pgr-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
