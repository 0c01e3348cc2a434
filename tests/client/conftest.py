import pytest

from broker_process import broker, make_broker  # noqa: F401 - fixtures
from pgreuse.client import hot


@pytest.fixture(params=["c", "python"])
def lease_path(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Run the test with the C hot path of the lease (``pgreuse._slots.Hot``) and without it (the
    Python path alone, its reference): what a user sees must be the same."""
    if request.param == "python":
        monkeypatch.setattr(hot, "for_connection", lambda conn, channel: hot.COLD)
    return request.param
