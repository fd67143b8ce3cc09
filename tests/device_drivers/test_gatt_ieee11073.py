"""IEEE 11073-20601 SFLOAT / FLOAT.

Vectors: the special values are the table of IEEE 11073-20601 clause F.8 (also in the
Bluetooth GATT Specification Supplement, medfloat16/medfloat32). 0xA2A6, 0xAD5A and 0xA4CE
are the values used by the Nordic nRF Connect SDK's sfloat unit tests (0.000678,
-0.000678, 0.00123). The others are derived by hand from the field layout
(value = mantissa * 10^exponent, 4/12-bit and 8/24-bit two's complement) and say how.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_drivers.gatt.errors import EncodeError, GattError
from device_drivers.gatt.ieee11073 import (
    SpecialValue,
    decode_float,
    decode_sfloat,
    encode_float,
    encode_sfloat,
    is_finite_value,
    pack_float,
    pack_sfloat,
    unpack_float,
    unpack_sfloat,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0x07FF, SpecialValue.NAN),
        (0x0800, SpecialValue.NRES),
        (0x07FE, SpecialValue.POSITIVE_INFINITY),
        (0x0802, SpecialValue.NEGATIVE_INFINITY),
        (0x0801, SpecialValue.RESERVED),
        # Reserved mantissas with a non-zero exponent stay special (documented choice).
        (0x17FF, SpecialValue.NAN),
        (0xF800, SpecialValue.NRES),
    ],
)
def test_sfloat_special_values(raw: int, expected: SpecialValue) -> None:
    assert decode_sfloat(raw) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0x0000, 0.0),
        (0x0078, 120.0),  # e=0, m=0x078=120
        (0x0072, 114.0),  # e=0, m=0x072=114
        (0xF16F, 36.7),  # e=-1 (0xF), m=0x16F=367
        (0xFFFF, -0.1),  # e=-1, m=0xFFF=-1
        (0x1001, 10.0),  # e=1, m=1
        (0x7001, 1e7),  # e=7 (largest), m=1
        (0x87FD, 2045e-8),  # e=-8 (smallest), m=2045 (largest finite)
        (0x0803, -2045.0),  # e=0, m=0x803=-2045 (smallest finite)
        (0xA2A6, 0.000678),  # nRF Connect SDK sfloat tests
        (0xAD5A, -0.000678),  # nRF Connect SDK sfloat tests
        (0xA4CE, 0.00123),  # nRF Connect SDK sfloat tests (1230e-6)
    ],
)
def test_sfloat_values(raw: int, expected: float) -> None:
    assert decode_sfloat(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0x007FFFFF, SpecialValue.NAN),
        (0x00800000, SpecialValue.NRES),
        (0x007FFFFE, SpecialValue.POSITIVE_INFINITY),
        (0x00800002, SpecialValue.NEGATIVE_INFINITY),
        (0x00800001, SpecialValue.RESERVED),
        (0xFF00016F, 36.7),  # e=-1, m=0x00016F=367
        (0xFE0F4240, 10000.0),  # e=-2, m=0x0F4240=1000000
        (0x00FFFFFF, -1.0),  # e=0, m=-1
        (0x007FFFFD, 8388605.0),  # largest finite mantissa
        (0x80000001, 1e-128),  # e=-128
    ],
)
def test_float_values(raw: int, expected: float | SpecialValue) -> None:
    assert decode_float(raw) == expected


@pytest.mark.parametrize(
    ("value", "raw"),
    [
        (120.0, 0x0078),
        (36.7, 0xF16F),
        (-0.1, 0xFFFF),
        (0.0, 0x0000),
        (-0.0, 0x0000),
        (50000.0, 0x21F4),  # 500e2: the mantissa cannot hold 50000
        (1e10, 0x73E8),  # 1000e7
        (98.76, 0xF3DC),  # too many digits: rounded half-even to 988e-1
        (math.nan, 0x07FF),
        (math.inf, 0x07FE),
        (-math.inf, 0x0802),
        (SpecialValue.NRES, 0x0800),
        (SpecialValue.RESERVED, 0x0801),
    ],
)
def test_encode_sfloat(value: float | SpecialValue, raw: int) -> None:
    assert encode_sfloat(value) == raw


def test_encode_float_examples() -> None:
    assert encode_float(36.7) == 0xFF00016F
    assert encode_float(SpecialValue.NAN) == 0x007FFFFF
    assert encode_float(-math.inf) == 0x00800002
    assert pack_float(36.7) == bytes.fromhex("6F0100FF")
    assert pack_sfloat(120.0) == bytes.fromhex("7800")
    assert unpack_float(bytes.fromhex("006F0100FF"), 1) == 36.7
    assert unpack_sfloat(bytes.fromhex("FF07")) is SpecialValue.NAN


@pytest.mark.parametrize("value", [2.1e10, -3e10, 1e300])
def test_encode_sfloat_out_of_range(value: float) -> None:
    with pytest.raises(EncodeError):
        encode_sfloat(value)
    assert issubclass(EncodeError, GattError)


def test_tiny_values_round_to_zero() -> None:
    assert encode_sfloat(1e-12) == 0


def test_every_sfloat_reencodes_to_the_same_value() -> None:
    # Exhaustive over all 65536 raw values: decode, encode, decode again.
    for raw in range(0x10000):
        value = decode_sfloat(raw)
        assert decode_sfloat(encode_sfloat(value)) == value, hex(raw)


@settings(max_examples=500)
@given(st.integers(0, 0xFFFFFFFF))
def test_float_reencodes_to_the_same_value(raw: int) -> None:
    value = decode_float(raw)
    assert decode_float(encode_float(value)) == value


@given(st.floats(min_value=-1e9, max_value=1e9) | st.sampled_from([math.nan, math.inf, -math.inf]))
def test_sfloat_encoding_is_close_or_rejected(value: float) -> None:
    try:
        raw = encode_sfloat(value)
    except EncodeError:
        assert abs(value) > 2e10
        return
    decoded = decode_sfloat(raw)
    if math.isnan(value):
        assert decoded is SpecialValue.NAN
    elif math.isinf(value):
        assert isinstance(decoded, SpecialValue)
    else:
        assert isinstance(decoded, float)
        # The mantissa keeps at least 205..2045 (three digits): half a unit of 205 at worst.
        assert abs(decoded - value) <= max(abs(value) * 0.5 / 205, 0.5e-8)


def test_is_finite_value() -> None:
    assert is_finite_value(1.5)
    assert not is_finite_value(None)
    assert not is_finite_value(SpecialValue.NAN)
    assert not is_finite_value(math.nan)
    assert not is_finite_value(math.inf)
