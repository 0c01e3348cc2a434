"""Reading a settings file the operator names (the settings file, the auth file): bounded, so a wrong
path (a log, a device) is refused with a clear message instead of read whole."""

from __future__ import annotations


def read_bounded(path: str, limit: int) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them.

    Raises:
        ValueError: it cannot be read, or it is larger than ``limit`` (the message says which).
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit} bytes: is it the right file?")
    return data
