from broker_process import broker, make_broker  # noqa: F401 - fixtures
from tls_cluster import certs, pg_tls  # noqa: F401 - fixtures
