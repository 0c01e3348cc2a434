"""Gunicorn hooks: the master starts and supervises the broker; workers connect after fork.

One line in ``gunicorn.conf.py``::

    from pgreuse.gunicorn import install; install(globals(), dsn="host=/var/run/postgresql dbname=app")

or, with the settings in the environment (``PGREUSE_DSN``, ``PGREUSE_SOCKET_DIR``, ``PGREUSE_PORT``,
``PGREUSE_MAX_SIZE``, ``PGREUSE_MIN_SIZE``, ``PGREUSE_WAIT_TIMEOUT``,
``PGREUSE_IDLE_TRANSACTION_TIMEOUT``, ``PGREUSE_MAX_LEASE_TIME``, ``PGREUSE_MAX_LIFETIME``,
``PGREUSE_MAX_IDLE``, ``PGREUSE_MAX_WAITING``, ``PGREUSE_ALLOW_UID``, ``PGREUSE_ALLOW_GID``)::

    from pgreuse.gunicorn import *  # noqa: F403

The broker runs as a child process of the master (``python -m pgreuse.broker --supervise``), never as
threads in the master, which forks workers. Its supervisor restarts it if it dies and exits with the
master. Nothing is opened in the master before fork: workers open their pgreuse connections lazily.
The hooks also export ``PGREUSE_CONNINFO`` (``host=<socket-dir> port=<port> dbname=<db>``) for the app.

Restarts (docs/failures.md):

* ``kill -HUP`` the master: Gunicorn re-reads ``gunicorn.conf.py`` and replaces its workers; the
  ``on_reload`` hook writes the settings again and sends the broker SIGHUP, which applies what can
  change live (sizes, timeouts: docs/configuration.md). The broker and its backends stay.
* ``kill -USR2`` the master (binary upgrade): the new master finds its old master's broker serving
  and adopts it instead of starting a second one: it names itself the broker's parent (the settings
  file's ``parent-pid``, and SIGHUP). The old master, WINCHed and QUIT, then leaves the broker alone.

The settings live in ``<socket-dir>/pgreuse.<port>.gunicorn.toml`` (mode 0600), but the DSN, which
travels in the environment, and the socket directory and port, on the broker's command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import attrs

from .broker import handover
from .broker.backend_target import parse_target
from .broker.config import BrokerConfig
from .broker.settings_file import write_settings
from .client.channel import broker_accepts

_broker: subprocess.Popen[bytes] | None = None  # the supervisor this master started
_config: BrokerConfig | None = None
_supervisor = 0  # its pid, or that of the supervisor adopted from the old master (USR2)
START_TIMEOUT = 30.0


def config_from_env(**overrides: Any) -> BrokerConfig:
    env = os.environ
    values: dict[str, Any] = {
        "dsn": env.get("PGREUSE_DSN", ""),
        "socket_dir": env.get("PGREUSE_SOCKET_DIR", "/run/pgreuse"),
        "port": int(env.get("PGREUSE_PORT", "6432")),
        "max_size": int(env.get("PGREUSE_MAX_SIZE", "10")),
        "min_size": int(env.get("PGREUSE_MIN_SIZE", "1")),
        "wait_timeout": float(env.get("PGREUSE_WAIT_TIMEOUT", "30")),
        "idle_transaction_timeout": float(env.get("PGREUSE_IDLE_TRANSACTION_TIMEOUT", "0")),
        "log_level": env.get("PGREUSE_LOG_LEVEL", "INFO").upper(),
        "max_waiting": int(env.get("PGREUSE_MAX_WAITING", "0")),
        "max_lease_time": float(env.get("PGREUSE_MAX_LEASE_TIME", "0")),
        "max_lifetime": float(env.get("PGREUSE_MAX_LIFETIME", "0")),
        "max_idle": float(env.get("PGREUSE_MAX_IDLE", "0")),
        "reset_every_lease": env.get("PGREUSE_RESET_EVERY_LEASE", "") not in ("", "0", "false"),
        "allow_uid": env.get("PGREUSE_ALLOW_UID", ""),  # other users' workers (Gunicorn's user=)
        "allow_gid": env.get("PGREUSE_ALLOW_GID", ""),
    }
    values.update(overrides)
    return BrokerConfig(**values)


# Settings of the broker the hook starts that travel on its command line rather than in the file:
# the DSN (it may hold a password: in the environment), and where it serves (fixed for its life).
_ON_COMMAND_LINE = ("dsn", "socket_dir", "port", "config_file")


def settings_path(config: BrokerConfig) -> str:
    """The settings file the hooks write for the broker they start (and re-read on reload)."""
    return os.path.join(config.socket_dir, f"pgreuse.{config.port}.gunicorn.toml")


def write_broker_settings(config: BrokerConfig) -> str:
    """Write ``config`` where the broker re-reads it; return the path."""
    os.makedirs(config.socket_dir, mode=0o700, exist_ok=True)
    path = settings_path(config)
    values = {f.name: getattr(config, f.name) for f in attrs.fields(BrokerConfig)}
    write_settings(path, {k: v for k, v in values.items() if k not in _ON_COMMAND_LINE})
    return path


def start_broker(config: BrokerConfig) -> subprocess.Popen[bytes]:
    """Start a supervised broker for ``config`` and wait until it accepts clients.

    Raises:
        RuntimeError: the broker exited or did not become ready within 30 s (its exit code and
            the reason are in the message and on stderr).
    """
    path = write_broker_settings(config)
    cmd = [sys.executable, "-m", "pgreuse.broker", "--supervise", "--socket-dir", config.socket_dir,
           "--port", str(config.port), "--config-file", path]  # fmt: skip
    env = dict(os.environ, PGREUSE_DSN=config.dsn)  # not on the command line: it may hold a password
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(
                f"pgreuse broker exited with code {code} before it was ready (see its log above)"
            )
        if broker_accepts(config.control_socket):
            return proc
        time.sleep(0.05)
    stop_broker(proc)
    raise RuntimeError(f"pgreuse broker not ready within {START_TIMEOUT}s at {config.socket_dir}")


def stop_broker(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ChildProcessError:
        pass  # the Gunicorn master reaped it with waitpid(-1) first


def conninfo_for(config: BrokerConfig) -> str:
    return f"host={config.socket_dir} port={config.port} dbname={parse_target(config.dsn).database}"


def _make_hooks(get_config: Callable[[], BrokerConfig]) -> dict[str, Callable[..., None]]:
    def on_starting(server: Any) -> None:
        global _broker, _config, _supervisor  # noqa: PLW0603
        # The broker exits with the master (pidfd), even if the master is SIGKILLed.
        _config = cfg = attrs.evolve(get_config(), parent_pid=os.getpid())
        os.environ["PGREUSE_CONNINFO"] = conninfo_for(cfg)
        old_master = int(getattr(server, "master_pid", 0) or 0)
        if old_master and broker_accepts(cfg.control_socket):
            # USR2: the old master's broker serves on, with its backends; this master takes it over.
            _supervisor = handover.adopt(cfg, old_master, settings_path(cfg), write_broker_settings)
            server.log.info("pgreuse broker (supervisor pid %s) adopted from master %s",
                            _supervisor, old_master)  # fmt: skip
            return
        _broker = start_broker(cfg)
        _supervisor = _broker.pid
        server.log.info(
            "pgreuse broker pid %s serving %s (max-size %d)",
            _broker.pid, cfg.socket_dir, cfg.max_size,
        )  # fmt: skip

    def on_reload(server: Any) -> None:
        # HUP: Gunicorn re-read gunicorn.conf.py (this hook is the new file's); the broker re-reads
        # the settings written here and applies those that can change live.
        global _config  # noqa: PLW0603
        if _config is None or not _supervisor:
            return
        cfg = attrs.evolve(get_config(), parent_pid=os.getpid())
        if (cfg.socket_dir, cfg.port) != (_config.socket_dir, _config.port):
            server.log.warning(
                "pgreuse: socket_dir/port changed in the Gunicorn config: the broker keeps %s port "
                "%d until Gunicorn is restarted", _config.socket_dir, _config.port,
            )  # fmt: skip
            cfg = attrs.evolve(cfg, socket_dir=_config.socket_dir, port=_config.port)
        _config = cfg
        write_broker_settings(cfg)
        with contextlib.suppress(ProcessLookupError):
            os.kill(_supervisor, signal.SIGHUP)
        server.log.info("pgreuse broker told to re-read its settings (max-size %d)", cfg.max_size)

    def post_fork(server: Any, worker: Any) -> None:
        # Nothing to open here: pgreuse connections are opened lazily in the worker, and any state
        # inherited from the master is dropped by pgreuse's own at-fork handler.
        pass

    def on_exit(server: Any) -> None:
        if _config is None or not _supervisor:
            return
        owner = handover.owner(settings_path(_config))
        if owner not in (0, os.getpid()):
            # USR2: the broker belongs to the new master now; it must outlive this one.
            server.log.info("pgreuse broker left running for master %s", owner)
            return
        if _broker is not None:
            stop_broker(_broker)
        else:
            handover.stop(_supervisor)

    return {"on_starting": on_starting, "on_reload": on_reload, "post_fork": post_fork,
            "on_exit": on_exit}  # fmt: skip


def install(namespace: MutableMapping[str, Any], **settings: Any) -> None:
    """Put pgreuse's hooks into a ``gunicorn.conf.py`` namespace (call with ``globals()``).

    ``settings`` are :class:`~pgreuse.broker.BrokerConfig` fields (``dsn``, ``socket_dir``, ``port``,
    ``max_size``, ...); missing ones come from the ``PGREUSE_*`` environment variables. A hook the
    config already defines is chained: pgreuse's runs first.
    """
    config = config_from_env(**settings)  # validate now: a bad value stops Gunicorn at once
    for name, hook in _make_hooks(lambda: config).items():
        existing = namespace.get(name)
        namespace[name] = _chain(hook, existing) if callable(existing) else hook


def _chain(first: Callable[..., None], second: Callable[..., None]) -> Callable[..., None]:
    # Gunicorn checks each hook's arity, so the chained hook keeps the exact positional signature.
    if first.__code__.co_argcount == 2:

        def chained2(server: Any, worker: Any) -> None:
            first(server, worker)
            second(server, worker)

        return chained2

    def chained1(server: Any) -> None:
        first(server)
        second(server)

    return chained1


_env_hooks = _make_hooks(config_from_env)
on_starting = _env_hooks["on_starting"]
post_fork = _env_hooks["post_fork"]
on_exit = _env_hooks["on_exit"]
on_reload = _env_hooks["on_reload"]

__all__ = ["on_exit", "on_reload", "on_starting", "post_fork"]
