"""Developer and CI commands: ``nox -s lint typecheck tests`` is what CI runs (see .ci/run)."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "typecheck", "tests"]  # demo is interactive: run it by name

LINT_PATHS = ["src", "tests", "noxfile.py", "examples", "bench"]
PASSTHROUGH_ENV = ["PGREUSE_TEST_DSN", "PGREUSE_PG_BINDIR"]

# The handoff hook rests on psycopg internals, so test the oldest and newest psycopg we support
# (pyproject: psycopg>=3.2.0,<3.4) with both implementations: the C one with its bundled libpq,
# and the pure-Python one on the system libpq (libpq5).
PSYCOPG_NEWEST = "3.3.9"
PSYCOPG_OLDEST = "3.2.0"
PSYCOPG_MATRIX = [
    (version, impl) for version in (PSYCOPG_NEWEST, PSYCOPG_OLDEST) for impl in ("binary", "python")
]
# Only these rest on psycopg internals; the newest binary combination runs the whole suite.
# The handoff rests on psycopg internals: the client tests and the fault tests (libpq seeing its
# backend die, close while leased, fork) run on every psycopg of the matrix.
PSYCOPG_SENSITIVE_TESTS = ["tests/client", "tests/wire", "tests/integration/test_faults.py"]
# The proxy's message scanners and its session core have C versions (pgreuse.wire._speedups and
# pgreuse.broker._proxycore, built by pip where a compiler is present) and Python references
# (pgreuse.wire.scan, pgreuse.broker.proxy.PyProxySession): the whole suite runs on C, and the
# newest pure-Python psycopg leg also runs the proxy tests on the Python references. The slot words
# (pgreuse._slots) follow the same switch: without them nothing is claimed, so that leg also runs the
# client tests with every transaction going through the broker's proxy.
PURE_PYTHON_PROXY_TESTS = [
    "tests/broker/test_proxy.py",
    "tests/broker/test_proxy_hot_path.py",
    "tests/broker/test_proxy_hot_path_inproc.py",
    "tests/broker/test_pgbench.py",
    "tests/broker/test_tls.py",
]
_SHOW_PSYCOPG = (
    "import psycopg; "
    "print('psycopg', psycopg.__version__, psycopg.pq.__impl__, 'libpq', psycopg.pq.version())"
)


def _passthrough_env() -> dict[str, str]:
    return {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}


@nox.session
@nox.parametrize(
    ("psycopg", "impl"),
    PSYCOPG_MATRIX,
    ids=[f"psycopg{version}-{impl}" for version, impl in PSYCOPG_MATRIX],
)
def tests(session: nox.Session, psycopg: str, impl: str) -> None:
    """Run pytest against a real PostgreSQL; ``nox -s tests -- <pytest args>`` picks the tests."""
    requirements = [f"psycopg=={psycopg}"]
    if impl == "binary":
        # Not psycopg[binary]==V: 3.2.0's extra pins the unpublished psycopg-binary==3.2.0.dev1
        # (psycopg/psycopg#853, fixed in 3.2.1), so name the C package itself.
        requirements.append(f"psycopg-binary=={psycopg}")
    session.install("-e", ".[test]", *requirements)
    if impl == "python":
        # A reused venv may still hold the C implementation from an earlier layout of this session.
        session.run("python", "-m", "pip", "uninstall", "-y", "-q", "psycopg-binary", "psycopg-c")
    env = {**_passthrough_env(), "PSYCOPG_IMPL": impl}
    pure_scanner = (psycopg, impl) == (PSYCOPG_NEWEST, "python")
    if pure_scanner:
        env.update(PGREUSE_PURE_PYTHON="1", PGREUSE_EXPECT_SCAN="python")
    elif os.environ.get("PGREUSE_REQUIRE_SPEEDUPS"):
        # CI (.ci/run) installs a compiler: a build that fell back to Python must fail there.
        env["PGREUSE_EXPECT_SCAN"] = "c"
    # Prove what is under test before running it: PSYCOPG_IMPL makes psycopg fail if it is missing.
    session.run(
        "python",
        "-c",
        f"{_SHOW_PSYCOPG}; assert psycopg.__version__ == {psycopg!r}, psycopg.__version__",
        env=env,
    )
    whole_suite = (psycopg, impl) == (PSYCOPG_NEWEST, "binary")
    selection = session.posargs or (
        [] if whole_suite else PSYCOPG_SENSITIVE_TESTS + (PURE_PYTHON_PROXY_TESTS if pure_scanner else [])
    )
    session.run("pytest", "-n", "2", *selection, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check (config in pyproject.toml)."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src/pgreuse (config in pyproject.toml)."""
    session.install("-e", ".[binary,dev,django,flask,test]")
    session.run("mypy", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start a throwaway cluster and a broker and show them working: ``nox -s demo -- --help``."""
    session.install("-e", ".[binary,gunicorn]")
    session.run("python", "-m", "pgreuse.demo", *session.posargs, env=_passthrough_env())


@nox.session
def examples(session: nox.Session) -> None:
    """Run examples/flask and examples/django under Gunicorn on a throwaway PostgreSQL and check
    their HTTP answers: ``nox -s examples`` (or ``-- flask``, ``-- django``). About 20 s.

    Not in CI's list: tests/integration/test_flask.py and test_django.py run the same driver.
    """
    session.install("-e", ".[binary,gunicorn,django,flask]")
    session.run("python", "examples/run_examples.py", *session.posargs, env=_passthrough_env())


BENCHMARKS = ("coordinator", "lease_cost", "proxy_vs_pgbouncer", "proxy_hot_path")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks behind docs/numbers.md. ``nox -s bench [-- <options>]`` runs
    bench/coordinator.py: pgreuse's handoff and proxy next to PgBouncer, dedicated connections and
    psycopg_pool on five workloads; it prints a markdown table and writes bench/results/coordinator.json
    and docs/coordinator.png. ``nox -s bench -- <name> [<options>]`` runs bench/<name>.py instead, one
    of lease_cost, proxy_vs_pgbouncer, proxy_hot_path; ``-- <name> --help`` lists its options.

    PgBouncer is needed unless ``--no-pgbouncer`` (Debian: apt-get install pgbouncer).
    """
    session.install("-e", ".[binary,bench]")
    args = list(session.posargs)
    name = args.pop(0) if args and args[0] in BENCHMARKS else "coordinator"
    session.run("python", f"bench/{name}.py", *args, env=_passthrough_env())


@nox.session
def chaos(session: nox.Session) -> None:
    """tests/integration/test_chaos.py for 10 minutes (CI runs it for 60 s): money moving through
    a pool of 4 while workers, backends, the broker and PostgreSQL are killed and restarted.
    ``nox -s chaos -- <seconds>`` sets the length."""
    session.install("-e", ".[test,binary]")
    seconds = session.posargs[0] if session.posargs else "600"
    env = {**_passthrough_env(), "PGREUSE_CHAOS_SECONDS": seconds}
    session.run("pytest", "-s", "tests/integration/test_chaos.py", env=env)


@nox.session
def soak(session: nox.Session) -> None:
    """bench/soak.py: 10 minutes of handoff, proxy and connect-per-request load through one broker,
    with a fault every 10 s; prints and draws (docs/soak.png) transactions, errors, backends, the
    broker's RSS and fds over time. ``nox -s soak -- --minutes 2`` for less. Not in CI."""
    session.install("-e", ".[binary,bench]")
    session.run("python", "bench/soak.py", *session.posargs, env=_passthrough_env())
