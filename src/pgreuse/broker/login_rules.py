"""Who the broker lets in, as its settings say: the allow lists of the Unix sockets
(``--allow-uid``/``--allow-gid``, :class:`~.access.Access`) and the users and passwords of the TCP
listener (``--auth-file``, :class:`~.password_login.PasswordLogin`).

Read at start and again at every reload, the auth file too even when its path is the same (its
users and passwords are what changes), and names anew (a user name may now be another uid). A
reload that cannot read them applies nothing; the rules in use stay.
"""

from __future__ import annotations

from .access import Access, parse_gids, parse_uids
from .config import BrokerConfig, ConfigError
from .password_login import PasswordLogin


def read_login_rules(config: BrokerConfig) -> tuple[Access, PasswordLogin | None]:
    """The allow lists and the auth file's users of ``config``, read now.

    Raises:
        ConfigError: a user or group that does not exist, or an auth file that cannot be read or
            holds a bad line; the message names the setting and the value.
    """
    try:
        uids = parse_uids(config.allow_uid)
    except ValueError as exc:
        raise ConfigError(f"--allow-uid {config.allow_uid!r}: {exc}") from exc
    try:
        gids = parse_gids(config.allow_gid)
    except ValueError as exc:
        raise ConfigError(f"--allow-gid {config.allow_gid!r}: {exc}") from exc
    passwords = None
    if config.auth_file:
        try:
            passwords = PasswordLogin.from_file(config.auth_file)
        except ValueError as exc:
            raise ConfigError(f"--auth-file: {exc}") from exc
    return Access(uids, gids), passwords
