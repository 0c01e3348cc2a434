"""The PostgreSQL server programs and processes of a :class:`~pgreuse.devcluster.DevCluster`, from
the host's side.

:func:`find_pg_bindir` finds initdb, pg_ctl and postgres. :func:`run_program` runs one of them with
the caller's ``PG*`` variables removed and, when this process is root (CI containers), as the
``postgres`` user through ``runuser``, because initdb refuses to run as root. :func:`kill_postmaster`
is a stop's last resort. None of this depends on a cluster's settings, so it lives apart from the
cluster's lifecycle in :mod:`pgreuse.devcluster`, which re-exports :class:`ClusterError` and
:func:`find_pg_bindir`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

# The cluster's logger: one name for all a DevCluster logs.
logger = logging.getLogger("pgreuse.devcluster")

_RUN_AS = "postgres"  # the OS user that owns the cluster when we are root
_INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql; "
    "Fedora: dnf install postgresql-server; macOS: brew install postgresql) "
    "or set PGREUSE_PG_BINDIR to the directory holding initdb, pg_ctl and postgres"
)


class ClusterError(RuntimeError):
    """The throwaway cluster could not be found, created, started or stopped."""


def _is_bindir(path: str) -> bool:
    exes = ("initdb", "pg_ctl", "postgres")
    return all(os.access(os.path.join(path, exe), os.X_OK) for exe in exes)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<major>/bin: "9.6" < "10" < "15" needs numeric, not string, order.
    version = os.path.basename(os.path.dirname(path))
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_pg_bindir() -> str:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks at ``$PGREUSE_PG_BINDIR``, then ``pg_ctl`` on ``PATH`` (symlinks resolved), then the
    highest ``/usr/lib/postgresql/*/bin`` (Debian keeps the server binaries off ``PATH``).

    Raises:
        ClusterError: no PostgreSQL server binaries were found; the message says what to install.
    """
    explicit = os.environ.get("PGREUSE_PG_BINDIR")
    if explicit:
        if _is_bindir(explicit):
            return explicit
        raise ClusterError(
            f"PGREUSE_PG_BINDIR={explicit!r} does not hold executable initdb, pg_ctl and postgres; "
            f"point it at the server's bin directory (e.g. /usr/lib/postgresql/15/bin)"
        )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidate = os.path.dirname(os.path.realpath(on_path))
        if _is_bindir(candidate):
            return candidate
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _is_bindir(candidate):
            return candidate
    raise ClusterError(f"no PostgreSQL server binaries (initdb, pg_ctl) found: {_INSTALL_HINT}")


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGHOST... from the caller's shell must not redirect initdb or pg_ctl.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run_as_root() -> bool:
    return os.geteuid() == 0


def require_run_as_user() -> None:
    """Check that, when this process is root, there is an OS user to run PostgreSQL as.

    Raises:
        ClusterError: running as root without a ``postgres`` OS user.
    """
    if _run_as_root():
        try:
            import pwd  # noqa: PLC0415 -- Unix-only module, needed only in the root case

            pwd.getpwnam(_RUN_AS)
        except KeyError:
            raise ClusterError(
                f"running as root, but there is no {_RUN_AS!r} OS user to run PostgreSQL as "
                f"(initdb refuses root): {_INSTALL_HINT}, or run as a non-root user"
            ) from None


def _command(bindir: str, exe: str, args: Sequence[str]) -> list[str]:
    argv = [os.path.join(bindir, exe), *args]
    if _run_as_root():
        return ["runuser", "-u", _RUN_AS, "--", *argv]
    return argv


def run_program(
    bindir: str, exe: str, args: Sequence[str], *, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``exe`` of ``bindir`` (as ``postgres`` when root) and return its combined output."""
    # cwd=/: the postgres user may not be able to enter the caller's cwd (e.g. /root).
    return subprocess.run(
        _command(bindir, exe, args),
        cwd="/",
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def kill_postmaster(pid_file: str, datadir: str) -> None:
    """SIGKILL the postmaster named in ``pid_file`` and wait up to 10 s for it to go; for a server
    that would not stop. A no-op when there is no pid file or no such process.

    Raises:
        ClusterError: not allowed to signal it.
    """
    try:
        with open(pid_file, encoding="ascii") as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        return
    logger.warning("killing postmaster %d of %s with SIGKILL", pid, datadir)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except PermissionError as exc:
        raise ClusterError(f"cannot kill postmaster {pid} of {datadir}: {exc}") from exc
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
