# The C module built from _proxycore.c and its parts (optional): see pgreuse.broker.proxy.
from typing import Any

class ProxyCounters:
    xacts: int
    queries: int
    received: int
    sent: int
    wait_ns: int
    denied: int
    broken: int
    def __init__(
        self,
        xacts: int = 0,
        queries: int = 0,
        received: int = 0,
        sent: int = 0,
        wait_ns: int = 0,
        denied: int = 0,
        broken: int = 0,
    ) -> None: ...

# The fields and methods are PyProxySession's (the C ones override them by name).
class SessionCore:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

# The hot fields of pgreuse.broker.pool.Backend and Pool (see _poolcore.h); pool.py declares them.
class BackendCore:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def dispatch_readable(self) -> None: ...

class WaiterCore:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

class PoolCore:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

def setup(
    reference: type,
    clean_outcome: object,
    max_pending: int,
    closed: object,
    idle: object,
    lent: object,
    shared: object,
    /,
) -> None: ...
