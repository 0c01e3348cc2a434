from broker_process import broker, make_broker  # noqa: F401 - fixtures
