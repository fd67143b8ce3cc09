"""The gateway package's errors."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error raised by ``gateway``."""


class ConfigError(GatewayError):
    """A setting is missing or wrong; the message names the variable or flag to fix."""


class BrokerError(GatewayError):
    """The MQTT broker could not be started or reached."""
