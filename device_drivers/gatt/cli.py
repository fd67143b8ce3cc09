"""``trialstream decode``: one characteristic value in, one JSON line per reading out."""

from __future__ import annotations

import json
import re
from typing import TextIO

from device_drivers.gatt.base import Measurement
from device_drivers.gatt.errors import GattError, InvalidHex
from device_drivers.gatt.registry import decode_to_measurements, parse_characteristic_id

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "measurement_json", "parse_hex", "run_decode"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2

_SEPARATORS = re.compile(r"[\s:\-]")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")


def parse_hex(text: str) -> bytes:
    """Hex bytes, with optional ``0x`` prefix and spaces, colons or dashes between them."""
    compact = _SEPARATORS.sub("", text)
    if compact[:2].lower() == "0x":
        compact = compact[2:]
    if not _HEX.fullmatch(compact):
        if len(compact) % 2:
            raise InvalidHex(f"invalid hex payload {text!r}: odd number of hex digits")
        raise InvalidHex(f"invalid hex payload {text!r}: not hexadecimal")
    return bytes.fromhex(compact)


def measurement_json(m: Measurement) -> dict[str, object]:
    return {
        "metric": m.metric,
        "value": m.value,
        "unit": m.unit,
        "time": m.time.isoformat() if m.time is not None else None,
        "flags": list(m.flags),
    }


def run_decode(characteristic: str, hex_payload: str, out: TextIO, err: TextIO) -> int:
    """Print one JSON object per reading to ``out``; on bad input one line to ``err``, exit 2."""
    try:
        char_id = parse_characteristic_id(characteristic)
        readings = decode_to_measurements(char_id, parse_hex(hex_payload))
    except GattError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    for m in readings:
        out.write(json.dumps(measurement_json(m)) + "\n")
    return EXIT_OK
