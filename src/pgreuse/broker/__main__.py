"""``python -m pgreuse.broker``: run a broker in the foreground, optionally supervised.

With ``--supervise`` this process stays small: it forks the real broker and forks a new one when the
broker dies abnormally (with a backoff), forwards SIGTERM/SIGINT and SIGHUP (reload), and exits when
``--parent-pid`` (the Gunicorn master) is gone. On SIGHUP it re-reads the settings too, for a new
``parent-pid``: the Gunicorn hook hands the broker over to the new master of a USR2 upgrade that way.

Gunicorn reaps every child of the master with ``waitpid(-1)``, so the master
cannot watch the broker's exit code itself; the supervisor is the broker's own parent and can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from .config import BrokerConfig, ConfigError
from .settings_file import SettingsSource
from .socket_files import remove_stale_sockets

logger = logging.getLogger("pgreuse.broker")


def run_broker(config: BrokerConfig, source: SettingsSource | None = None) -> int:
    from .server import Broker  # noqa: PLC0415 - keep the supervisor's memory small

    try:
        broker = Broker(config, source)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(broker.run())
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # (proxy mode, issue 3) uvloop, when installed, roughly halves the loop's cost per proxied
    # message; PGREUSE_LOOP=asyncio keeps the standard loop.
    if os.environ.get("PGREUSE_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def supervise(config: BrokerConfig, source: SettingsSource | None = None) -> int:
    stopping = False
    child = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    def reload(_signum: int, _frame: object) -> None:
        nonlocal config
        if child:
            os.kill(child, signal.SIGHUP)  # the broker re-reads and logs what it did
        if source is not None and source.file:
            # Only what the supervisor itself uses: the parent it exits with, and the settings a
            # restarted broker starts from. A bad file is the broker's to report.
            with contextlib.suppress(ConfigError):
                config = source.load()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    backoff = 0.5
    while True:
        started = time.monotonic()
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (the broker's loop handles it)
            os._exit(run_broker(config, source))
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except ChildProcessError:
                status = 0
                break
            except InterruptedError:
                continue
        dead, child = child, 0  # (reaped: its pid may be another process's by now)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            # Killed: its socket files are left behind, and look alive to clients (and to a test
            # that the broker is gone) until the next broker replaces them, if there is one.
            remove_stale_sockets(config)
        if stopping or code in (0, 2):
            return code
        if config.parent_pid and not _alive(config.parent_pid):
            return 0
        if time.monotonic() - started > 60:
            backoff = 0.5
        logger.error("broker pid %d exited with %d; restarting in %.1fs", dead, code, backoff)
        restart_at = time.monotonic() + backoff
        while not stopping and time.monotonic() < restart_at:
            time.sleep(0.05)  # (a SIGTERM during the backoff stops here, with no new broker)
        if stopping:
            return code
        backoff = min(backoff * 2, 10.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    try:
        source = SettingsSource.from_argv(argv)
        config = source.load()
    except ConfigError as exc:
        print(f"pgreuse broker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s pgreuse[%(process)d] %(levelname)s %(message)s",
    )
    if source.supervise:
        return supervise(config, source)
    return run_broker(config, source)


if __name__ == "__main__":
    sys.exit(main())
