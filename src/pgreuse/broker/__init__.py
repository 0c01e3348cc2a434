"""The broker: owns the backend connections and lends them (``python -m pgreuse.broker``)."""

from .config import BrokerConfig, ConfigError

__all__ = ["BrokerConfig", "ConfigError"]
