"""Bounds-checked little-endian reading and range-checked writing shared by the profiles."""

from __future__ import annotations

import struct

from device_drivers.gatt.errors import EncodeError, MalformedPayload
from device_drivers.gatt.ieee11073 import Numeric, encode_float, encode_sfloat, unpack_float
from device_drivers.gatt.ieee11073 import unpack_sfloat as _unpack_sfloat

__all__ = ["Reader", "Writer", "char_label"]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_S16 = struct.Struct("<h")
_U32 = struct.Struct("<I")


def char_label(char_id: int) -> str:
    """``0x2A37`` style text for a 16-bit characteristic UUID."""
    return f"0x{char_id:04X}"


class Reader:
    """A cursor over one characteristic value; every read checks the remaining length."""

    __slots__ = ("_characteristic", "_data", "_offset")

    def __init__(self, data: bytes, char_id: int) -> None:
        self._data = bytes(data)
        self._offset = 0
        self._characteristic = char_label(char_id)

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def error(
        self, message: str, detail: str = "", *, offset: int | None = None
    ) -> MalformedPayload:
        where = self._offset if offset is None else offset
        return MalformedPayload(self._characteristic, where, message, detail)

    def _need(self, size: int) -> int:
        start = self._offset
        missing = size - self.remaining
        if missing > 0:
            plural = "" if missing == 1 else "s"
            raise self.error("payload too short", f"need {missing} more byte{plural}")
        self._offset = start + size
        return start

    def take(self, size: int) -> bytes:
        start = self._need(size)
        return self._data[start : start + size]

    def rest(self) -> bytes:
        return self.take(self.remaining)

    def u8(self) -> int:
        return int(_U8.unpack_from(self._data, self._need(_U8.size))[0])

    def u16(self) -> int:
        return int(_U16.unpack_from(self._data, self._need(_U16.size))[0])

    def s16(self) -> int:
        return int(_S16.unpack_from(self._data, self._need(_S16.size))[0])

    def u24(self) -> int:
        start = self._need(3)
        return int.from_bytes(self._data[start : start + 3], "little")

    def u32(self) -> int:
        return int(_U32.unpack_from(self._data, self._need(_U32.size))[0])

    def sfloat(self) -> Numeric:
        return _unpack_sfloat(self._data, self._need(2))

    def float32(self) -> Numeric:
        return unpack_float(self._data, self._need(4))

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        """Unpack a fixed group of integer fields described by a module-level Struct."""
        return tuple(int(v) for v in layout.unpack_from(self._data, self._need(layout.size)))


def _check(value: int, low: int, high: int, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EncodeError(f"{value!r} is not an integer ({kind})")
    if not low <= value <= high:
        raise EncodeError(f"{value} does not fit {kind} ({low}..{high})")
    return value


class Writer:
    """Builds one characteristic value; integers are range-checked, never truncated."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def raw(self, data: bytes) -> None:
        self._parts.append(bytes(data))

    def u8(self, value: int) -> None:
        self._parts.append(_U8.pack(_check(value, 0, 0xFF, "uint8")))

    def u16(self, value: int) -> None:
        self._parts.append(_U16.pack(_check(value, 0, 0xFFFF, "uint16")))

    def s16(self, value: int) -> None:
        self._parts.append(_S16.pack(_check(value, -0x8000, 0x7FFF, "sint16")))

    def u24(self, value: int) -> None:
        self._parts.append(_check(value, 0, 0xFFFFFF, "uint24").to_bytes(3, "little"))

    def sfloat(self, value: Numeric) -> None:
        self._parts.append(_U16.pack(encode_sfloat(value)))

    def float32(self, value: Numeric) -> None:
        self._parts.append(_U32.pack(encode_float(value)))

    def pack(self, layout: struct.Struct, *values: int) -> None:
        try:
            self._parts.append(layout.pack(*values))
        except struct.error as exc:
            raise EncodeError(f"{values!r} do not fit {layout.format!r}: {exc}") from exc

    def getvalue(self) -> bytes:
        return b"".join(self._parts)
