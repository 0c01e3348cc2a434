"""The ``--auth-file`` of the TCP listener: who may log in with a password, in PgBouncer's format.

Contract: :func:`read_userlist` parses a ``userlist.txt`` — one ``"user" "password"`` per line, each
field in double quotes (``""`` inside one is a quote), the rest of the line ignored, empty lines and
lines starting with ``;`` or ``#`` skipped — and raises ``ValueError`` naming the file, the line and
what to change, never a password. A password is either a SCRAM secret as PostgreSQL stores it
(``SCRAM-SHA-256$...``, from ``pg_authid.rolpassword``) or the plaintext. :func:`load_secrets` turns
them into :class:`~pgreuse.wire.scram_server.ScramSecret`, deriving a secret with a fresh salt
for each plaintext password.

An md5 hash (``md5...``) is refused: clients are checked with SCRAM-SHA-256, and an md5 hash cannot
check a SCRAM proof (PgBouncer can use one only for md5 logins, which PostgreSQL deprecated).
"""

from __future__ import annotations

import os
import re
import stat

from ..wire.scram_server import DEFAULT_ITERATIONS, SALT_BYTES, ScramSecret
from .bounded_read import read_bounded

_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")
MAX_AUTH_FILE = 16 * 1024 * 1024  # a userlist this large is a wrong path, not a list of users


def read_userlist(path: str) -> dict[str, str]:
    """user -> password or SCRAM secret, as written in the file at ``path``.

    Raises:
        ValueError: the file cannot be read, a line is malformed, a user appears twice, or a
            password is empty or an md5 hash.
    """
    try:
        raw = read_bounded(path, MAX_AUTH_FILE)
    except ValueError as exc:
        raise ValueError(f"{path!r}: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path!r} is not UTF-8 (byte {exc.start})") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in ";#":
            continue
        where = f"{path}, line {number}"
        user, rest = _quoted(stripped, where, "user name")
        password, _ignored = _quoted(rest.lstrip(), where, f"password of user {user!r}")
        if not user:
            raise ValueError(f"{where}: the user name is empty")
        if user in users:
            raise ValueError(f"{where}: user {user!r} is listed twice; keep one line per user")
        if not password:
            raise ValueError(
                f"{where}: user {user!r} has an empty password, with which no client can log in; "
                "give a password or a SCRAM secret, or remove the line"
            )
        if _MD5_HASH.fullmatch(password):
            raise ValueError(
                f"{where}: user {user!r} has an md5 hash, which cannot check the SCRAM-SHA-256 "
                "logins the broker asks for; give the password, or its SCRAM secret (SELECT "
                "rolpassword FROM pg_authid, with password_encryption = 'scram-sha-256')"
            )
        if password.startswith("SCRAM-"):
            try:
                ScramSecret.parse(password)
            except ValueError as exc:
                raise ValueError(f"{where}: the secret of user {user!r} is malformed: {exc}") from None
        users[user] = password
    return users


def load_secrets(path: str) -> dict[str, ScramSecret]:
    """user -> SCRAM secret for every user of the file (see :func:`read_userlist` for errors)."""
    return {
        user: ScramSecret.parse(password)
        if password.startswith("SCRAM-")
        else ScramSecret.from_password(password, os.urandom(SALT_BYTES), DEFAULT_ITERATIONS)
        for user, password in read_userlist(path).items()
    }


def readable_by_others(path: str) -> bool:
    """True if users other than the file's owner and group may read it (worth a warning)."""
    try:
        return bool(os.stat(path).st_mode & stat.S_IROTH)
    except OSError:
        return False


def _quoted(text: str, where: str, what: str) -> tuple[str, str]:
    """The double-quoted field at the start of ``text`` and what follows it."""
    if not text.startswith('"'):
        raise ValueError(f'{where}: the {what} must be in double quotes ("user" "password")')
    out: list[str] = []
    pos = 1
    while True:
        end = text.find('"', pos)
        if end < 0:
            raise ValueError(f"{where}: the {what} has no closing double quote")
        out.append(text[pos:end])
        if text.startswith('"', end + 1):  # "" is a quote inside the field
            out.append('"')
            pos = end + 2
            continue
        return "".join(out), text[end + 1 :]
