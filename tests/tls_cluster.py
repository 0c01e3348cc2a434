"""A PostgreSQL cluster with ``ssl=on`` and certificates made for the test run (``openssl`` CLI).

``make_certs(dir)`` writes a CA (``ca.crt``), a server certificate it signed for ``localhost`` and
``127.0.0.1`` (``server.crt``/``server.key``), and an unrelated CA (``other-ca.crt``) to show that
verification fails against the wrong root. ``tls_cluster(certs)`` starts a DevCluster serving
them. When the tests run as root the server runs as ``postgres``, which must own its key with mode
0600 (PostgreSQL refuses a key others can read).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import attrs
import pytest

from pgreuse.devcluster import ClusterError, DevCluster

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@attrs.frozen
class Certs:
    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    @property
    def other_ca(self) -> str:
        return os.path.join(self.dir, "other-ca.crt")

    @property
    def server_crt(self) -> str:
        return os.path.join(self.dir, "server.crt")

    @property
    def server_key(self) -> str:
        return os.path.join(self.dir, "server.key")


def _openssl(*args: str, cwd: str) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(path: str) -> Certs:
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
                 "-subj", f"/CN=pgreuse test {name}", cwd=path)  # fmt: skip
    _openssl("req", *_EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=path)
    with open(os.path.join(path, "san.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf",
             cwd=path)  # fmt: skip
    os.chmod(path, 0o755)  # the server (postgres user) must reach its files
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o600 if name.endswith(".key") else 0o644)
    if os.geteuid() == 0:
        shutil.chown(os.path.join(path, "server.key"), user="postgres", group=None)
    return Certs(path)


def tls_cluster(certs: Certs) -> DevCluster:
    conf = {"ssl": "on", "ssl_cert_file": certs.server_crt, "ssl_key_file": certs.server_key}
    try:
        return DevCluster.create(extra_conf=conf)
    except ClusterError as exc:
        pytest.fail(f"cannot start PostgreSQL with ssl=on: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def certs() -> Iterator[Certs]:
    path = tempfile.mkdtemp(prefix="pgr-certs-", dir="/tmp")
    try:
        yield make_certs(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_tls(certs: Certs) -> Iterator[DevCluster]:
    """A cluster with ssl=on, shared by the tests of a process: do not change its configuration."""
    cluster = tls_cluster(certs)
    try:
        yield cluster
    finally:
        cluster.destroy()
