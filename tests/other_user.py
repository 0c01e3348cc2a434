"""Clients run as another user (uid ``nobody``, through setpriv) against a broker's sockets: for the
access-control tests, which need root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from broker_process import BrokerProcess

NOBODY = 65534

# Run as the other user: one action, its outcome as JSON on stdout.
CLIENT = r"""
import json, socket, sys
action, conninfo, control_path = sys.argv[1:4]
out = {}
try:
    if action == "psycopg":
        import psycopg
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            out["row"] = list(conn.execute("select current_user, 41 + 1").fetchone())
    elif action == "pgreuse":
        import pgreuse
        with pgreuse.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            out["rows"] = [conn.execute("select %s::int", (i,)).fetchone()[0] for i in range(3)]
            with conn.transaction():
                out["rows"].append(conn.execute("select 9").fetchone()[0])
    elif action == "control":
        import os
        from pgreuse.wire import control
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        s.connect(control_path)
        s.send(control.encode(control.Hello(control.VERSION, os.getpid())))
        msgs, fds = [], 0
        s.settimeout(1)
        try:
            while True:
                data, got, _flags, _addr = socket.recv_fds(s, 4096, 4)
                if not data:
                    break
                fds += len(got)
                msgs.append(repr(control.decode(data)))
        except socket.timeout:
            pass
        out["messages"], out["fds"] = msgs, fds
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def as_other_user(b: BrokerProcess, action: str, *, groups: str = "", dbname: str = "") -> dict[str, Any]:
    """Run the client ``action`` as uid nobody, with primary group nogroup and ``groups``."""
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}"]
    setpriv += [f"--groups={groups}"] if groups else ["--clear-groups"]
    conninfo = f"host={b.socket_dir} port={b.port} dbname={dbname or b.dbname}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME="/tmp", PGPASSFILE="/nonexistent")
    done = subprocess.run(
        [*setpriv, sys.executable, "-c", CLIENT, action, conninfo, b.control_socket],
        capture_output=True, text=True, timeout=60, check=False, cwd="/", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result
