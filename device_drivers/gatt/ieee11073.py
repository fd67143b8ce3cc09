"""IEEE 11073-20601 SFLOAT (16 bit) and FLOAT (32 bit) medical number formats.

Both are ``mantissa * 10 ** exponent`` with two's-complement fields: SFLOAT has a 4-bit
exponent and a 12-bit mantissa, FLOAT an 8-bit exponent and a 24-bit mantissa. Five mantissa
values are reserved as special values (IEEE 11073-20601, clause F.8; the same table is in the
Bluetooth SIG's GATT Specification Supplement, "medfloat16" / "medfloat32"):

============  ===========  ==============  ======================
special       mantissa     SFLOAT (e = 0)  FLOAT (e = 0)
============  ===========  ==============  ======================
NaN           +(2^(n-1)-1) ``0x07FF``      ``0x007FFFFF``
NRes          -(2^(n-1))   ``0x0800``      ``0x00800000``
+INF          +(2^(n-1)-2) ``0x07FE``      ``0x007FFFFE``
-INF          -(2^(n-1)-2) ``0x0802``      ``0x00800002``
reserved      -(2^(n-1)-1) ``0x0801``      ``0x00800001``
============  ===========  ==============  ======================

The standard defines them with exponent 0. A payload carrying one of these mantissas with a
non-zero exponent is decoded as the same special value (as most open implementations do), so
finite mantissas are those in ``-(2^(n-1)-3) .. 2^(n-1)-3`` (±2045 for SFLOAT, ±8388605 for
FLOAT). A special value never becomes a reading: decoders return :class:`SpecialValue`.

Decoded numbers are Python floats: ``mantissa * 10 ** exponent`` rounded once (exact integer
arithmetic, then one correctly rounded division), so ``0xFF00016F`` is exactly ``36.7``.
Encoding picks the exact representation whose exponent is nearest zero; a value with more
digits than the mantissa holds is rounded half-even at the finest exponent that fits.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TypeAlias, TypeGuard

from device_drivers.gatt.errors import EncodeError

__all__ = [
    "FLOAT32",
    "SFLOAT",
    "MedicalFloat",
    "Numeric",
    "SpecialValue",
    "decode_float",
    "decode_sfloat",
    "encode_float",
    "encode_sfloat",
    "is_finite_value",
    "pack_float",
    "pack_sfloat",
    "unpack_float",
    "unpack_sfloat",
]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class SpecialValue(enum.Enum):
    """The IEEE 11073-20601 special values; none of them is a measurement."""

    NAN = "NaN"
    NRES = "NRes"
    POSITIVE_INFINITY = "+INF"
    NEGATIVE_INFINITY = "-INF"
    RESERVED = "reserved"


Numeric: TypeAlias = float | SpecialValue
"""A decoded SFLOAT/FLOAT: a finite float, or the special value the device sent."""


@dataclass(frozen=True, slots=True)
class MedicalFloat:
    """One of the two IEEE 11073 number formats, described by its field widths."""

    name: str
    exponent_bits: int
    mantissa_bits: int

    @property
    def width(self) -> int:
        return self.exponent_bits + self.mantissa_bits

    @property
    def max_mantissa(self) -> int:
        """Largest finite mantissa magnitude (the five values above are special)."""
        return (1 << (self.mantissa_bits - 1)) - 3

    @property
    def min_exponent(self) -> int:
        return -(1 << (self.exponent_bits - 1))

    @property
    def max_exponent(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    def special_mantissas(self) -> dict[int, SpecialValue]:
        half = 1 << (self.mantissa_bits - 1)
        return {
            half - 1: SpecialValue.NAN,
            -half: SpecialValue.NRES,
            half - 2: SpecialValue.POSITIVE_INFINITY,
            -(half - 2): SpecialValue.NEGATIVE_INFINITY,
            -(half - 1): SpecialValue.RESERVED,
        }


SFLOAT = MedicalFloat("SFLOAT", exponent_bits=4, mantissa_bits=12)
FLOAT32 = MedicalFloat("FLOAT", exponent_bits=8, mantissa_bits=24)

_SPECIAL_BY_MANTISSA = {fmt: fmt.special_mantissas() for fmt in (SFLOAT, FLOAT32)}
_MANTISSA_BY_SPECIAL = {
    fmt: {special: mantissa for mantissa, special in table.items()}
    for fmt, table in _SPECIAL_BY_MANTISSA.items()
}


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _decode(raw: int, fmt: MedicalFloat) -> Numeric:
    mantissa = _signed(raw & ((1 << fmt.mantissa_bits) - 1), fmt.mantissa_bits)
    special = _SPECIAL_BY_MANTISSA[fmt].get(mantissa)
    if special is not None:
        return special
    exponent = _signed(raw >> fmt.mantissa_bits, fmt.exponent_bits)
    if exponent >= 0:
        return float(mantissa * 10**exponent)
    divisor: int = 10**-exponent
    return mantissa / divisor


def _pack(mantissa: int, exponent: int, fmt: MedicalFloat) -> int:
    exponent_mask = (1 << fmt.exponent_bits) - 1
    mantissa_mask = (1 << fmt.mantissa_bits) - 1
    return ((exponent & exponent_mask) << fmt.mantissa_bits) | (mantissa & mantissa_mask)


def _exact(value: Decimal, fmt: MedicalFloat) -> tuple[int, int] | None:
    """The exact (mantissa, exponent) whose exponent is nearest zero, if there is one."""
    sign, digits, exponent = value.normalize().as_tuple()
    if not isinstance(exponent, int):
        return None
    mantissa = int("".join(map(str, digits)))
    if exponent >= 0:
        # Move trailing zeros into the mantissa while it fits, down to exponent 0.
        while exponent > 0 and mantissa * 10 <= fmt.max_mantissa:
            mantissa *= 10
            exponent -= 1
        if exponent > fmt.max_exponent:
            return None
    elif exponent < fmt.min_exponent:
        return None
    if mantissa > fmt.max_mantissa:
        return None
    return (-mantissa if sign else mantissa), exponent


def _rounded(value: Decimal, fmt: MedicalFloat) -> tuple[int, int] | None:
    """The finest exponent at which the half-even rounded mantissa fits."""
    digits = len(str(fmt.max_mantissa))
    start = max(fmt.min_exponent, value.adjusted() - digits + 1)
    for exponent in range(start, fmt.max_exponent + 1):
        mantissa = int(value.scaleb(-exponent).to_integral_value(rounding=ROUND_HALF_EVEN))
        if mantissa == 0:
            return 0, 0
        if abs(mantissa) <= fmt.max_mantissa:
            return mantissa, exponent
    return None


def _encode(value: Numeric, fmt: MedicalFloat) -> int:
    if isinstance(value, SpecialValue):
        return _pack(_MANTISSA_BY_SPECIAL[fmt][value], 0, fmt)
    if math.isnan(value):
        return _encode(SpecialValue.NAN, fmt)
    if math.isinf(value):
        special = SpecialValue.POSITIVE_INFINITY if value > 0 else SpecialValue.NEGATIVE_INFINITY
        return _encode(special, fmt)
    if value == 0:
        return 0
    # repr() gives the shortest decimal that reads back as this float.
    number = Decimal(repr(float(value)))
    found = _exact(number, fmt) or _rounded(number, fmt)
    if found is None:
        raise EncodeError(f"{value!r} is outside the {fmt.name} range")
    return _pack(found[0], found[1], fmt)


def decode_sfloat(raw: int) -> Numeric:
    """Decode a 16-bit SFLOAT given as an unsigned integer."""
    return _decode(raw & 0xFFFF, SFLOAT)


def decode_float(raw: int) -> Numeric:
    """Decode a 32-bit FLOAT given as an unsigned integer."""
    return _decode(raw & 0xFFFFFFFF, FLOAT32)


def encode_sfloat(value: Numeric) -> int:
    """Encode to a 16-bit SFLOAT (unsigned integer); float NaN/±inf map to the specials."""
    return _encode(value, SFLOAT)


def encode_float(value: Numeric) -> int:
    """Encode to a 32-bit FLOAT (unsigned integer); float NaN/±inf map to the specials."""
    return _encode(value, FLOAT32)


def unpack_sfloat(data: bytes, offset: int = 0) -> Numeric:
    """Decode the little-endian SFLOAT at ``offset`` (the caller checks the length)."""
    (raw,) = _U16.unpack_from(data, offset)
    return decode_sfloat(int(raw))


def unpack_float(data: bytes, offset: int = 0) -> Numeric:
    """Decode the little-endian FLOAT at ``offset`` (the caller checks the length)."""
    (raw,) = _U32.unpack_from(data, offset)
    return decode_float(int(raw))


def pack_sfloat(value: Numeric) -> bytes:
    return _U16.pack(encode_sfloat(value))


def pack_float(value: Numeric) -> bytes:
    return _U32.pack(encode_float(value))


def is_finite_value(value: Numeric | None) -> TypeGuard[float]:
    """True for a present, finite number: the only kind that may become a reading."""
    return isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)
