"""Where the broker's settings come from: the command line and a TOML file that can be re-read.

``--config-file FILE`` names a TOML file whose keys are the broker's long flag names (``max-size =
20``; ``max_size`` works too) at its top level. The settings are, in order of precedence:

1. flags given on the command line (and ``PGREUSE_DSN`` for the DSN): fixed for the life of the
   process, like PostgreSQL's command-line options, so a reload never changes them;
2. the file, re-read on SIGHUP and on the admin console's ``RELOAD`` (:mod:`.reload` decides what of
   it applies live);
3. the defaults.

Every bad key or value is refused with the file's name, the key and what to do; a reload that meets
one keeps the settings it has.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .bounded_read import read_bounded
from .config import BrokerConfig, ConfigError
from .flags import build_parser, check_command_line_dsn, from_parser

# Settings a file may not hold: the file itself, and how the process runs.
_NOT_IN_FILE = frozenset({"config_file", "supervise"})
_FIELDS = {f.name: f for f in attrs.fields(BrokerConfig)}
MAX_FILE_BYTES = 1 << 20  # a settings file is a few hundred bytes; a huge one is a mistake


def read_settings(path: str) -> dict[str, Any]:
    """The settings in the TOML file ``path``, as BrokerConfig field names and typed values.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or holds an unknown key or a value of
            the wrong type (the message names the file, the key and the value).
    """
    try:
        data = read_bounded(path, MAX_FILE_BYTES)
    except ValueError as exc:
        raise ConfigError(f"--config-file {path!r}: {exc}") from exc
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config-file {path!r} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        field = _FIELDS.get(name)
        if field is None or name in _NOT_IN_FILE:
            raise ConfigError(
                f"--config-file {path!r}: unknown setting {key!r}; the keys are the broker's long "
                "flag names (python -m pgreuse.broker --help), e.g. max-size = 20"
            )
        values[name] = _typed(path, key, value, field.default)
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    return values


def _typed(path: str, key: str, value: object, default: object) -> object:
    want = type(default) if default is not attrs.NOTHING else str
    ok = (
        isinstance(value, bool)
        if want is bool
        else isinstance(value, int | float) and not isinstance(value, bool)
        if want is float
        else isinstance(value, want) and not isinstance(value, bool)
    )
    if not ok:
        example = {bool: "true", int: "20", float: "2.5", str: '"text"'}[want]
        raise ConfigError(
            f"--config-file {path!r}: {key} = {value!r} is a {type(value).__name__}, and {key} takes "
            f"a {want.__name__} (e.g. {key} = {example})"
        )
    return float(value) if want is float else value  # type: ignore[arg-type]  # (checked above)


def _given_on_command_line(argv: Sequence[str] | None) -> dict[str, Any]:
    """The flags ``argv`` sets, parsed, by destination: the parser again, with no defaults."""
    parser = build_parser()
    for action in parser._actions:  # (argparse lists its actions nowhere public)
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


@attrs.frozen
class SettingsSource:
    """The command line's settings and the file's path: :meth:`load` builds the config from them
    again, which is what a reload does."""

    given: Mapping[str, Any]  # BrokerConfig fields set on the command line (or PGREUSE_DSN)
    file: str  # absolute path of --config-file, or ""
    supervise: bool = False

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> SettingsSource:
        """Parse the command line (argparse exits with usage on a malformed one).

        Raises:
            ConfigError: a password in ``--dsn`` (the command line is public).
        """
        args = build_parser().parse_args(argv)
        check_command_line_dsn(args.dsn)
        explicit = _given_on_command_line(argv)
        given = from_parser({name: getattr(args, name) for name in explicit if name in _FIELDS})
        if "dsn" not in given and args.dsn:
            given["dsn"] = args.dsn  # (from PGREUSE_DSN)
        path = os.path.abspath(args.config_file) if args.config_file else ""
        given["config_file"] = path
        return cls(given, path, bool(args.supervise))

    def load(self) -> BrokerConfig:
        """The settings now: the defaults, the file over them, the command line over both.

        Raises:
            ConfigError: the file, or a value in it or on the command line, is bad.
        """
        return self.load_with_notes()[0]

    def load_with_notes(self) -> tuple[BrokerConfig, list[str]]:
        """:meth:`load`, and a note for each file setting the command line overrides."""
        from_file = read_settings(self.file) if self.file else {}
        notes = [
            f"{name.replace('_', '-')} = {value!r} in {self.file} is overridden by the command "
            f"line's --{name.replace('_', '-')} {self.given[name]!r}"
            for name, value in from_file.items()
            if name in self.given and self.given[name] != value and name != "dsn"
        ]
        try:
            return BrokerConfig(**{**from_file, **self.given}), notes
        except ConfigError as exc:
            if self.file:
                raise ConfigError(f"{exc} (settings from {self.file} and the command line)") from exc
            raise
        except TypeError as exc:  # dsn in neither: BrokerConfig() requires it
            raise ConfigError(
                "no PostgreSQL DSN: pass --dsn 'host=... dbname=... user=...', set PGREUSE_DSN, or "
                "put dsn = '...' in the --config-file"
            ) from exc


def write_settings(path: str, values: Mapping[str, object]) -> None:
    """Write ``values`` (BrokerConfig field names) as a settings file, atomically (a broker that
    re-reads it meanwhile sees the old file or the new one, never half of one), mode 0600."""
    lines = ["# Written by pgreuse; re-read by the broker on SIGHUP and RELOAD.\n"]
    for name, value in values.items():
        if name in _NOT_IN_FILE or name not in _FIELDS:
            raise ValueError(f"{name!r} is not a setting a file may hold")
        # JSON's strings, numbers and booleans are TOML's too (basic strings share the escapes).
        lines.append(f"{name.replace('_', '-')} = {json.dumps(value)}\n")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    os.rename(tmp, path)


def parse_argv(argv: Sequence[str] | None = None) -> tuple[BrokerConfig, bool]:
    """Parse the command line (and the ``--config-file`` it names); return the config and whether
    to supervise."""
    source = SettingsSource.from_argv(argv)
    return source.load(), source.supervise
