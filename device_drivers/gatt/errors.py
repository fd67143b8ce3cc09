"""Typed errors of the GATT parsers: callers match on these types, never on message text."""

from __future__ import annotations

from device_drivers.errors import DeviceDriverError

__all__ = [
    "EncodeError",
    "GattError",
    "InvalidHex",
    "MalformedPayload",
    "UnknownCharacteristic",
]


class GattError(DeviceDriverError, ValueError):
    """Base of every error raised by ``device_drivers.gatt``."""


class MalformedPayload(GattError):
    """A characteristic value that cannot be decoded (too short, or a field out of range).

    ``characteristic`` is the 16-bit UUID as text (``"0x2A37"``), ``offset`` the byte offset
    in the payload where decoding stopped, ``message`` what is wrong there and ``detail`` an
    optional hint (``"need 1 more byte"``).
    """

    def __init__(self, characteristic: str, offset: int, message: str, detail: str = "") -> None:
        self.characteristic = characteristic
        self.offset = offset
        self.message = message
        self.detail = detail
        text = f"{characteristic} {message} at offset {offset}"
        super().__init__(f"{text}: {detail}" if detail else text)


class EncodeError(GattError):
    """A value that the wire format cannot carry (out of range, or not representable)."""


class UnknownCharacteristic(GattError):
    """A characteristic id that is not understood: garbage text, or no decoder for it."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"{reason}: {text!r}")


class InvalidHex(GattError):
    """Payload text (CLI input) that is not a sequence of hex bytes."""
