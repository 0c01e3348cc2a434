from broker_process import broker, lease_path, make_broker  # noqa: F401 - fixtures
