"""Run the Flask and Django examples for real and check their answers (``nox -s examples``).

For each example: a database on a throwaway PostgreSQL cluster (:class:`pgreuse.devcluster.DevCluster`),
Gunicorn started with the example's own ``gunicorn.conf.py`` (its master starts the pgreuse broker),
the example's set-up command through that broker (``flask init-db``; ``manage.py migrate`` and
``createsuperuser``), then real HTTP requests from many client threads, checked against what the app
must answer, while ``pg_stat_activity`` is sampled to show the backends never exceed ``max_size``.

:func:`run_flask` and :func:`run_django` are also what tests/integration/test_flask.py and
test_django.py call, against the test suite's cluster. Each raises ``AssertionError`` (with the
Gunicorn log) when an answer is wrong, and returns a summary dict when all are right.
"""

from __future__ import annotations

import argparse
import contextlib
import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import sql

from pgreuse.client.channel import broker_accepts

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_SIZE = 4  # what both examples' gunicorn.conf.py give install()
START_TIMEOUT = 60.0


# -- HTTP ---------------------------------------------------------------------------------------------


class Client:
    """A tiny JSON-over-HTTP client with a cookie jar (for the Django admin's session and CSRF)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(
        self, method: str, path: str, body: Any = None, *, form: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        headers = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with self.opener.open(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, raw = self.request(method, path, body)
        if status != expect:
            raise AssertionError(f"{method} {path} answered {status}, expected {expect}: {raw[:500]!r}")
        return json.loads(raw)

    def cookie(self, name: str) -> str:
        for c in self.jar:
            if c.name == name and c.value is not None:
                return c.value
        raise AssertionError(f"no {name!r} cookie was set")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Gunicorn and the broker it starts ----------------------------------------------------------------


@contextlib.contextmanager
def gunicorn(example: str, env: dict[str, str], log_path: str) -> Iterator[str]:
    """Run Gunicorn in ``examples/<example>`` with its gunicorn.conf.py; yield its base URL.

    Waits until the broker accepts clients and Gunicorn answers HTTP. Stops Gunicorn (SIGTERM) at
    exit, which stops the broker.
    """
    port = _free_port()
    cwd = os.path.join(HERE, example)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        control = os.path.join(env["PGREUSE_SOCKET_DIR"], f".s.PGREUSE.{env.get('PGREUSE_PORT', '6432')}")
        deadline = time.monotonic() + START_TIMEOUT
        while not broker_accepts(control) or not _answers(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gunicorn for examples/{example} did not come up:\n{_tail(log_path)}")
            time.sleep(0.1)
        yield base
    except BaseException as exc:
        if isinstance(exc, AssertionError) and "--- gunicorn log" not in str(exc):
            raise AssertionError(f"{exc}\n--- gunicorn log ---\n{_tail(log_path)}") from exc
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (404 included) means the workers serve
    except OSError:
        return False


def _tail(path: str, limit: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except OSError as exc:
        return f"(no log: {exc})"


def _run(cmd: Sequence[str], *, cwd: str, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


class PeakBackends:
    """Samples ``pg_stat_activity`` for the backends with one application_name, in a thread."""

    def __init__(self, admin_dsn: str, application_name: str) -> None:
        self.admin_dsn = admin_dsn
        self.application_name = application_name
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakBackends:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "select count(*) from pg_stat_activity where application_name = %s",
                    [self.application_name],
                ).fetchone()
                self.peak = max(self.peak, row[0] if row else 0)
                time.sleep(0.01)


def _environment(dsn: str, socket_dir: str, application_name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "DJANGO_"))}
    env.update(
        PGREUSE_DSN=psycopg.conninfo.make_conninfo(dsn, application_name=application_name),
        PGREUSE_SOCKET_DIR=socket_dir,
        PGREUSE_PORT="6432",
        PGREUSE_LOG_LEVEL="WARNING",
    )
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    env["PGREUSE_CONNINFO"] = f"host={socket_dir} port=6432 dbname={dbname}"
    return env


def _parallel(n: int, fn: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(fn, range(n)))


# -- the examples -------------------------------------------------------------------------------------


def run_flask(admin_dsn: str, dsn: str, socket_dir: str) -> dict[str, Any]:
    """examples/flask: init-db, 40 concurrent POSTs, reads, 10 updates in transactions, a 404."""
    app_name = "pgreuse-example-flask"
    env = _environment(dsn, socket_dir, app_name)
    with gunicorn("flask", env, os.path.join(socket_dir, "gunicorn-flask.log")) as base, \
            PeakBackends(admin_dsn, app_name) as peak:  # fmt: skip
        out = _run([sys.executable, "-m", "flask", "--app", "app", "init-db"],
                   cwd=os.path.join(HERE, "flask"), env=env)  # fmt: skip
        assert "table todos is ready" in out, out
        client = Client(base)
        created = _parallel(40, lambda i: client.json("POST", "/todos", {"title": f"todo {i}"}, 201))
        ids = sorted(c["id"] for c in created)
        assert len(set(ids)) == 40, ids
        todos = client.json("GET", "/todos")["todos"]
        assert sorted(t["title"] for t in todos) == sorted(f"todo {i}" for i in range(40)), todos
        done = _parallel(10, lambda i: client.json("POST", f"/todos/{ids[i]}/done"))
        assert all(d["was_done"] is False and d["backend"] for d in done), done
        status, _ = client.request("POST", "/todos/999999/done")
        assert status == 404, status
        status, _ = client.request("POST", "/todos", {"no": "title"})
        assert status == 400, status
        stats = client.json("GET", "/stats")
        assert (stats["open"], stats["done"]) == (30, 10), stats
        workers = {c["worker"] for c in created}
    assert 0 < peak.peak <= MAX_SIZE, f"{peak.peak} backends for max_size {MAX_SIZE}"
    return {"requests": 54, "workers": len(workers), "peak_backends": peak.peak}


def run_django(admin_dsn: str, dsn: str, socket_dir: str) -> dict[str, Any]:
    """examples/django: migrate, createsuperuser, 60 concurrent orders on 50 in stock, the admin."""
    app_name = "pgreuse-example-django"
    env = _environment(dsn, socket_dir, app_name)
    env.update(DJANGO_SUPERUSER_USERNAME="admin", DJANGO_SUPERUSER_PASSWORD="example-pw-1",
               DJANGO_SUPERUSER_EMAIL="admin@example.com")  # fmt: skip
    cwd = os.path.join(HERE, "django")
    with gunicorn("django", env, os.path.join(socket_dir, "gunicorn-django.log")) as base, \
            PeakBackends(admin_dsn, app_name) as peak:  # fmt: skip
        _run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=cwd, env=env)
        _run([sys.executable, "manage.py", "createsuperuser", "--noinput"], cwd=cwd, env=env)
        client = Client(base)
        widget = client.json("POST", "/products/", {"name": "widget", "stock": 50}, 201)["id"]
        client.json("POST", "/products/", {"name": "gadget", "stock": 5}, 201)

        def order(_: int) -> int:
            status, _body = client.request("POST", "/orders/", {"product": widget, "quantity": 1})
            return status

        statuses = _parallel(60, order)
        # select_for_update() inside atomic(): exactly the stock is sold, never more.
        assert sorted(statuses) == [201] * 50 + [409] * 10, statuses
        products = {p["name"]: p["stock"] for p in client.json("GET", "/products/")["products"]}
        assert products == {"gadget": 5, "widget": 0}, products
        summary = client.json("GET", "/orders/summary/")
        assert summary == {"widget": {"orders": 50, "quantity": 50}}, summary

        # The admin: log in as the superuser and load the orders changelist.
        admin = Client(base)
        status, page = admin.request("GET", "/admin/login/")
        assert status == 200, status
        match = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert match, page[:500]
        status, page = admin.request(
            "POST", "/admin/login/?next=/admin/",
            form={"csrfmiddlewaretoken": match.group(1).decode(), "username": "admin",
                  "password": "example-pw-1", "next": "/admin/"},
        )  # fmt: skip
        assert status == 200 and b"Site administration" in page, (status, page[:800])
        status, page = admin.request("GET", "/admin/orders/order/")
        assert status == 200 and b"50 orders" in page, (status, page[:800])
    assert 0 < peak.peak <= MAX_SIZE, f"{peak.peak} backends for max_size {MAX_SIZE}"
    return {"requests": 70, "peak_backends": peak.peak}


def create_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("examples", nargs="*", metavar="flask|django", help="default: both")
    args = p.parse_args(argv)
    unknown = set(args.examples) - {"flask", "django"}
    if unknown:
        p.error(f"no example named {', '.join(sorted(unknown))}: choose flask and/or django")
    args.examples = args.examples or ["flask", "django"]

    from pgreuse.devcluster import DevCluster  # noqa: PLC0415

    runners = {"flask": run_flask, "django": run_django}
    t0 = time.monotonic()
    print("starting a throwaway PostgreSQL cluster ...", flush=True)
    failed = 0
    with DevCluster.create(max_connections=40) as cluster:
        admin = cluster.dsn(dbname="postgres")
        for name in args.examples:
            socket_dir = tempfile.mkdtemp(prefix=f"pgr-ex-{name}-", dir="/tmp")
            dbname = f"example_{name}"
            create_database(admin, dbname)
            t1 = time.monotonic()
            try:
                summary = runners[name](admin, cluster.dsn(dbname=dbname), socket_dir)
            except AssertionError as exc:
                failed += 1
                print(f"examples/{name}: FAILED\n{exc}", flush=True)
            else:
                print(f"examples/{name}: OK in {time.monotonic() - t1:.1f}s {summary}", flush=True)
            finally:
                shutil.rmtree(socket_dir, ignore_errors=True)
    print(f"{'FAILED' if failed else 'OK'} ({time.monotonic() - t0:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
