"""The one exception base of the hub side (``device_drivers``): callers match on types."""

from __future__ import annotations


class DeviceDriverError(Exception):
    """Base of every error raised by ``device_drivers`` (outbox, relay, drivers, parsers)."""
