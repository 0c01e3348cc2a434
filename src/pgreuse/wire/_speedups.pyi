# The C module built from _speedups.c (optional): see pgreuse.wire.scan.
def scan_server(
    data: bytes | bytearray | memoryview, pos: int, syncs: int, /
) -> tuple[int, int, int, int]: ...
def scan_client(
    data: bytes | bytearray | memoryview, n: int, session_mode: bool, /
) -> tuple[int, int, int]: ...
