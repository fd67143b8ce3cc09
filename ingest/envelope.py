"""The envelope codec: signed batches of readings, hub to gateway (docs/protocol.md section 4).

An envelope is a COSE_Sign1 message (RFC 9052, CBOR tag 18) signed with ES256
(:mod:`ingest.cose`) whose payload is a CBOR map in the protocol's profile
(:mod:`ingest.wire`). docs/protocol.md is the normative description and this module is its
one implementation. Everything here is pure: bytes and keys in, frozen dataclasses or bytes
out, no I/O and no clock (ECDSA nonces come from the operating system).

Three payload versions are read: v1; v2, whose readings may carry the device's own
statement about them (flags, the device's user id) and whose sensor reports name the user
slot a shared wearable is paired for; and v3, which may also say the hub's local time zone.
A hub seals v3; v1 and v2 are sealed only on request (for conformance tests and hubs that
have not been upgraded). Every failure of
:func:`open_envelope` is an :class:`EnvelopeError` with a :class:`~ingest.model.Reason`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.cose import open_sign1, sign1, verify_sign1
from ingest.model import (
    MAX_DEVICE_USER,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Gap,
    Payload,
    Reading,
    Reason,
    SensorReport,
    ZoneReport,
)
from ingest.wire import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEVICE_ID_BYTES,
    Buffer,
    EnvelopeError,
    check_device_id,
    check_keys,
    int_field,
    is_int,
    loads,
    number,
    text,
)

# 256 KiB: an envelope of MAX_ITEMS_PER_ENVELOPE readings with every string at its maximum
# length and no flags is about 250 000 bytes; a typical reading is ~40 bytes, so ordinary
# batches use a few percent of it. It also bounds the gateway's work per message. Flags make
# a reading up to ~600 bytes longer: a hub seals fewer readings into an envelope when they
# would not fit (device_drivers.outbox).
MAX_ENVELOPE_BYTES: Final = 256 * 1024

# 1000 readings (plus gaps) per envelope: at 1 Hz per metric that is minutes of data from a
# few wearables per signature.
MAX_ITEMS_PER_ENVELOPE: Final = 1000

# String bounds, in UTF-8 bytes.
MAX_METRIC_BYTES: Final = 64
MAX_UNIT_BYTES: Final = 32
MAX_SENSOR_BYTES: Final = 128
MAX_GAP_REASON_BYTES: Final = 64
# A reading's flags (v2): at most 16 distinct codes of 1-32 characters from a-z 0-9 _,
# starting with a letter. The registry of their meanings is ingest.flags; an unregistered
# code is stored as the device said it, and classed as information only.
MAX_FLAGS_PER_READING: Final = 16
MAX_FLAG_BYTES: Final = 32
# A stored record's key (v2): the device's own identity of the record, e.g. "g:42:1767225600000".
MAX_RECORD_BYTES: Final = 64
_FLAG_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)

_PAYLOAD_KEYS: Final = frozenset({"v", "dev", "seq", "sent", "r", "gaps"})
# Optional keys: "s" (sensor reports), sent when a wearable (re)connects or its battery
# changes; "tz" (v3: the hub's time zone), sent after the hub starts and when it changes.
_OPTIONAL_KEYS: Final = {1: frozenset({"s"}), 2: frozenset({"s"}), 3: frozenset({"s", "tz"})}
# An IANA time zone name as the database spells them ("Europe/Berlin", "America/Port-au-Prince",
# "Etc/GMT+5"); the gateway also checks that it knows the zone before it records it.
MAX_TIME_ZONE_BYTES: Final = 64
TIME_ZONE_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_+/-]{0,63}", re.ASCII)
MAX_SENSORS_PER_ENVELOPE: Final = 16
MAX_SENSOR_FIELD_BYTES: Final = 64
# Array lengths by payload version: a reading (without, with status), a sensor report.
_READING_LENGTHS: Final = {1: (5,), 2: (5, 8), 3: (5, 8)}
_SENSOR_LENGTH: Final = {1: 7, 2: 8, 3: 8}
_NO_STATUS: Final = ((), None, None)
_SPOKEN: Final = " and ".join(f"v{n}" for n in PROTOCOL_VERSIONS)


@dataclass(frozen=True, slots=True)
class Opened:
    """A structurally valid envelope whose signature has not been checked yet.

    ``kid`` names the device whose key must verify it (see :func:`verify`); the raw
    ``protected``, ``payload_bytes`` and ``signature`` are what the signature covers.
    """

    kid: str
    payload: Payload
    protected: bytes
    payload_bytes: bytes
    signature: bytes


# --- public API -------------------------------------------------------------------------


def seal(payload: Payload, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign ``payload`` with the hub's key; the result opens with :func:`open_envelope`.

    The payload is checked against the same rules the decoder applies, so a hub never signs
    an envelope the gateway must refuse as malformed.
    """
    payload_bytes = cbor2.dumps(_payload_to_obj(payload))
    data = sign1(payload_bytes, payload.dev, key)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"sealed envelope is {len(data)} bytes > {MAX_ENVELOPE_BYTES}"
        )
    return data


def open_envelope(data: Buffer, *, max_size: int = MAX_ENVELOPE_BYTES) -> Opened:
    """Decode and check an envelope without verifying its signature.

    Raises :class:`EnvelopeError` (``too_large``, ``malformed`` or ``unsupported_version``)
    and nothing else, whatever the input bytes.
    """
    kid, protected, payload_bytes, signature = open_sign1(data, max_size)
    obj = _loads_canonical_payload(payload_bytes)
    if obj is None:
        payload = _payload_from_obj(loads(payload_bytes, "payload"))
    else:
        payload = _payload_from_obj(obj, canonical=True)
    if payload.dev != kid:
        raise EnvelopeError(Reason.MALFORMED, "kid and payload dev differ")
    return Opened(
        kid=kid,
        payload=payload,
        protected=protected,
        payload_bytes=payload_bytes,
        signature=signature,
    )


def verify(opened: Opened, public_key: ec.EllipticCurvePublicKey) -> None:
    """Check the ES256 signature of an opened envelope; raise ``bad_signature`` if it fails."""
    verify_sign1(opened.protected, opened.payload_bytes, opened.signature, public_key)


def check_reading(reading: Reading) -> None:
    """Raise ``malformed`` if ``reading`` could not be carried in an envelope."""
    _reading_to_obj(reading, 0, PROTOCOL_VERSION)


def check_gap(gap: Gap) -> None:
    """Raise ``malformed`` if ``gap`` could not be carried in an envelope."""
    _gap_to_obj(gap, 0, PROTOCOL_VERSION)


# --- the fast path for the encoding this codec produces ------------------------------------
#
# Nearly every envelope arrives exactly as ``seal`` encodes it. For those, the checks of the
# item-by-item scan are made by two cheaper means: the COSE_Sign1 frame is matched byte by
# byte, and the payload by one regular expression (run in C) of the payload's canonical
# layout. Each accepts a subset of what the scan accepts, and the payload is then decoded
# and checked by the same code as on the slow path; anything else takes the slow path, which
# also writes the error messages. tests/ingest/test_envelope_fast_path.py holds the two
# paths to the same answers.


def _text_pattern(max_bytes: int) -> bytes:
    """A definite text string of 1..max_bytes bytes in its shortest head, as a regex, with no
    C0 control or DEL byte (in UTF-8 no other character contains one) and no 0xC2 byte: C1
    controls (U+0080..U+009F) are 0xC2 0x80..0x9F in UTF-8, so a text with any character of
    U+0080..U+00BF takes the slow path, which checks each text. (Searching the whole payload
    for that byte pair instead also finds it in times and values, which sent most large
    envelopes down the slow path.)"""
    char = rb"[^\x00-\x1f\x7f\xc2]"
    short = [re.escape(bytes([0x60 + n])) + char + b"{%d}" % n for n in range(1, 24)]
    longer = [
        b"\\x78" + re.escape(bytes([n])) + char + b"{%d}" % n for n in range(24, max_bytes + 1)
    ]
    return b"(?:" + b"|".join(short + longer) + b")"


_RE_UINT = (
    rb"(?:[\x00-\x17]|\x18[\x00-\xff]|\x19[\x00-\xff]{2}|\x1a[\x00-\xff]{4}|\x1b[\x00-\xff]{8})"
)
_RE_INT = (
    rb"(?:[\x00-\x17\x20-\x37]|[\x18\x38][\x00-\xff]|[\x19\x39][\x00-\xff]{2}"
    rb"|[\x1a\x3a][\x00-\xff]{4}|[\x1b\x3b][\x00-\xff]{8})"
)
# An int64: as _RE_INT, but an 8-byte argument below 2**63 (so -2**63 .. 2**63 - 1).
_RE_INT64 = (
    rb"(?:[\x00-\x17\x20-\x37]|[\x18\x38][\x00-\xff]|[\x19\x39][\x00-\xff]{2}"
    rb"|[\x1a\x3a][\x00-\xff]{4}|[\x1b\x3b][\x00-\x7f][\x00-\xff]{7})"
)
_RE_FLOAT = rb"(?:\xf9[\x00-\xff]{2}|\xfa[\x00-\xff]{4}|\xfb[\x00-\xff]{8})"
_RE_ARRAY_HEAD = rb"(?:[\x80-\x97]|\x98[\x00-\xff]|\x99[\x00-\xff]{2})"
# A reading whose every field already meets the decoder's checks: an int64 time, text within
# its byte limit, a float value. (Integer values, which the decoder turns into floats, take
# the slow path.) The decoder builds such readings without looking at them again.
_RE_READING = (
    rb"\x85"
    + _RE_INT64
    + _text_pattern(MAX_METRIC_BYTES)
    + _RE_FLOAT
    + _text_pattern(MAX_UNIT_BYTES)
    + _text_pattern(MAX_SENSOR_BYTES)
)
# {"v": uint, "dev": text, "seq": uint, "sent": int, "r": [reading...], "gaps": []}, in the
# order ``seal`` writes them. Envelopes with gaps or sensor reports take the slow path.
_CANONICAL_PAYLOAD: Final = re.compile(
    rb"\xa6\x61v"
    + _RE_UINT
    + rb"\x63dev"
    + _text_pattern(MAX_DEVICE_ID_BYTES)
    + rb"\x63seq"
    + _RE_UINT
    + rb"\x64sent"
    + _RE_INT
    + rb"\x61r"
    + _RE_ARRAY_HEAD
    + rb"(?:"
    + _RE_READING
    + rb")*\x64gaps\x80",
    re.DOTALL,
)


def _loads_canonical_payload(data: bytes) -> Any:
    """The decoded payload if it is in the canonical layout, else None.

    The regular expression checks every item's type and head, but not that each array
    holds as many items as its head says: the decoder must then end exactly at the end of
    the input, and ``_payload_from_obj`` finds the payload's keys, which any disagreement
    between head and items would displace.
    """
    if _CANONICAL_PAYLOAD.fullmatch(data) is None:
        return None
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError):
        return None
    return obj if stream.tell() == len(data) else None


# --- payload maps -------------------------------------------------------------------------


def _payload_to_obj(payload: Payload) -> dict[str, Any]:
    v = payload.v
    if v not in PROTOCOL_VERSIONS:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"v={v}: this codec seals {_SPOKEN}")
    count = len(payload.readings) + len(payload.gaps)
    if count > MAX_ITEMS_PER_ENVELOPE:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"{count} readings and gaps > {MAX_ITEMS_PER_ENVELOPE}"
        )
    if len(payload.sensors) > MAX_SENSORS_PER_ENVELOPE:
        raise EnvelopeError(Reason.TOO_LARGE, f"more than {MAX_SENSORS_PER_ENVELOPE} sensors")
    obj: dict[str, Any] = {
        "v": v,
        "dev": check_device_id(payload.dev),
        "seq": int_field(payload.seq, "seq", lo=0),
        "sent": int_field(payload.sent_ms, "sent"),
        "r": [_reading_to_obj(r, i, v) for i, r in enumerate(payload.readings)],
        "gaps": [_gap_to_obj(g, i, v) for i, g in enumerate(payload.gaps)],
    }
    if payload.sensors:
        obj["s"] = [_sensor_to_obj(s, i, v) for i, s in enumerate(payload.sensors)]
    if payload.zone is not None:
        if v < 3:
            raise EnvelopeError(Reason.MALFORMED, "a time zone needs protocol v3")
        obj["tz"] = _zone_to_obj(payload.zone)
    return obj


def _zone_from_obj(obj: object) -> ZoneReport:
    since, name = _zone_to_obj(obj)
    return ZoneReport(time_zone=name, since_ms=since)


def _zone_to_obj(zone: object) -> list[Any]:
    """``[since_ms, name]``, checked: the name is an IANA-shaped zone name of 1-64 bytes."""
    if isinstance(zone, ZoneReport):
        since, name = zone.since_ms, zone.time_zone
    elif isinstance(zone, list) and len(zone) == 2:
        since, name = zone
    else:
        raise EnvelopeError(Reason.MALFORMED, "tz must be [since_ms, time zone]")
    since = int_field(since, "tz since")
    name = text(name, "tz time zone", MAX_TIME_ZONE_BYTES)
    if TIME_ZONE_RE.fullmatch(name) is None:
        raise EnvelopeError(Reason.MALFORMED, "tz time zone is not an IANA time zone name")
    return [since, name]


def _payload_from_obj(obj: object, *, canonical: bool = False) -> Payload:
    """The payload of a decoded map. ``canonical``: the map was matched by
    ``_CANONICAL_PAYLOAD``, whose grammar checks every reading's fields already."""
    if not isinstance(obj, dict):
        raise EnvelopeError(Reason.MALFORMED, "payload must be a map")
    v = _check_version(obj)
    check_keys(obj, _PAYLOAD_KEYS | (_OPTIONAL_KEYS[v] & obj.keys()), "payload")
    readings, gaps = obj["r"], obj["gaps"]
    sensors = obj.get("s", [])
    if "s" in obj and (
        not isinstance(sensors, list) or not 1 <= len(sensors) <= MAX_SENSORS_PER_ENVELOPE
    ):
        raise EnvelopeError(Reason.MALFORMED, f"s must be an array of 1-{MAX_SENSORS_PER_ENVELOPE}")
    if not isinstance(readings, list) or not isinstance(gaps, list):
        raise EnvelopeError(Reason.MALFORMED, "r and gaps must be arrays")
    count = len(readings) + len(gaps)
    if count > MAX_ITEMS_PER_ENVELOPE:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"{count} readings and gaps > {MAX_ITEMS_PER_ENVELOPE}"
        )
    if canonical and all(type(r) is list and len(r) == 5 for r in readings):
        # The grammar checked each field; the reading has no status. tuple.__new__ is the
        # cheapest way to build the named tuple (about 1.6x faster than its constructor).
        new, status = tuple.__new__, _NO_STATUS
        built = tuple(new(Reading, (*r, *status)) for r in readings)
    else:
        built = tuple(_reading_from_obj(r, i, v) for i, r in enumerate(readings))
    return Payload(
        dev=check_device_id(obj["dev"]),
        seq=int_field(obj["seq"], "seq", lo=0),
        sent_ms=int_field(obj["sent"], "sent"),
        readings=built,
        gaps=tuple(_gap_from_obj(g, i, v) for i, g in enumerate(gaps)),
        v=v,
        sensors=tuple(_sensor_from_obj(s, i, v) for i, s in enumerate(sensors)),
        zone=_zone_from_obj(obj["tz"]) if "tz" in obj else None,
    )


def _device_user(x: object, what: str) -> int | None:
    return None if x is None else int_field(x, what, lo=0, hi=MAX_DEVICE_USER)


def _sensor_to_obj(report: SensorReport, i: int, v: int) -> list[Any]:
    where = f"s[{i}]"
    fields = (report.manufacturer, report.model, report.serial, report.firmware, report.hardware)
    battery = report.battery_level
    if battery is not None and (not is_int(battery) or not 0 <= battery <= 100):
        raise EnvelopeError(Reason.MALFORMED, f"{where} battery must be 0-100")
    obj = [
        text(report.sensor, f"{where} sensor", MAX_SENSOR_BYTES),
        *(None if f is None else text(f, f"{where} field", MAX_SENSOR_FIELD_BYTES) for f in fields),
        battery,
    ]
    paired = _device_user(report.paired_user, f"{where} paired user")
    if v >= 2:
        obj.append(paired)
    elif paired is not None:
        raise EnvelopeError(Reason.MALFORMED, f"{where}: a paired user needs protocol v2")
    return obj


def _sensor_from_obj(obj: object, i: int, v: int) -> SensorReport:
    where = f"s[{i}]"
    length = _SENSOR_LENGTH[v]
    if not isinstance(obj, list) or len(obj) != length:
        raise EnvelopeError(Reason.MALFORMED, f"{where} must be a {length}-element array")
    texts = [
        None if f is None else text(f, f"{where} field", MAX_SENSOR_FIELD_BYTES) for f in obj[1:6]
    ]
    battery = obj[6]
    if battery is not None:
        battery = int_field(battery, f"{where} battery", lo=0, hi=100)
    manufacturer, model, serial, firmware, hardware = texts
    return SensorReport(
        text(obj[0], f"{where} sensor", MAX_SENSOR_BYTES),
        manufacturer,
        model,
        serial,
        firmware,
        hardware,
        battery,
        _device_user(obj[7], f"{where} paired user") if v >= 2 else None,
    )


def _flags(x: object, what: str) -> tuple[str, ...]:
    """A reading's flags: distinct registered-form codes, returned sorted."""
    if not isinstance(x, list | tuple) or len(x) > MAX_FLAGS_PER_READING:
        raise EnvelopeError(
            Reason.MALFORMED, f"{what} must be an array of at most {MAX_FLAGS_PER_READING}"
        )
    for flag in x:
        if not isinstance(flag, str) or _FLAG_RE.fullmatch(flag) is None:
            raise EnvelopeError(
                Reason.MALFORMED,
                f"{what}: a flag is 1-{MAX_FLAG_BYTES} of a-z 0-9 _, starting with a letter",
            )
    if len(set(x)) != len(x):
        raise EnvelopeError(Reason.MALFORMED, f"{what}: a flag is given twice")
    return tuple(sorted(x))


def _reading_to_obj(reading: Reading, i: int, v: int) -> list[Any]:
    where = f"r[{i}]"
    obj = [
        int_field(reading.t_ms, f"{where}.t_ms"),
        text(reading.metric, f"{where}.metric", MAX_METRIC_BYTES),
        number(reading.value, f"{where}.value"),
        text(reading.unit, f"{where}.unit", MAX_UNIT_BYTES),
        text(reading.sensor, f"{where}.sensor", MAX_SENSOR_BYTES),
    ]
    flags = _flags(reading.flags, f"{where}.flags")
    user = _device_user(reading.user, f"{where}.user")
    record = _record(reading.record, f"{where}.record")
    if flags or user is not None or record is not None:
        if v < 2:
            raise EnvelopeError(
                Reason.MALFORMED, f"{where}: flags, user and record need protocol v2"
            )
        obj += [list(flags), user, record]
    return obj


def _record(x: object, what: str) -> str | None:
    return None if x is None else text(x, what, MAX_RECORD_BYTES)


def _reading_from_obj(obj: object, i: int, v: int) -> Reading:
    # Fast path for the common, well-formed reading without status: the same checks as the
    # slow path (printable ASCII text within its byte limit, an int64 time, a finite-range
    # number), without building messages. Anything else takes the slow path, which says what
    # is wrong.
    if type(obj) is list and len(obj) == 5:
        t_ms, metric, value, unit, sensor = obj
        if (
            type(t_ms) is int
            and INT64_MIN <= t_ms <= INT64_MAX
            and type(metric) is str
            and 0 < len(metric) <= MAX_METRIC_BYTES
            and metric.isascii()
            and metric.isprintable()
            and type(unit) is str
            and 0 < len(unit) <= MAX_UNIT_BYTES
            and unit.isascii()
            and unit.isprintable()
            and type(sensor) is str
            and 0 < len(sensor) <= MAX_SENSOR_BYTES
            and sensor.isascii()
            and sensor.isprintable()
        ):
            if type(value) is float:
                return Reading(t_ms, metric, value, unit, sensor)
            if type(value) is int and -(2**53) <= value <= 2**53:
                return Reading(t_ms, metric, float(value), unit, sensor)
    lengths = _READING_LENGTHS[v]
    if not isinstance(obj, list) or len(obj) not in lengths:
        status = ", flags, user, record]" if v >= 2 else "]"
        raise EnvelopeError(
            Reason.MALFORMED, f"r[{i}] must be [t_ms, metric, value, unit, sensor{status}"
        )
    if len(obj) == 8:
        # The status is checked here: _reading_to_obj would refuse an empty one, which a
        # decoder accepts (it means the same as no status).
        flags = _flags(obj[5], f"r[{i}].flags")
        user = _device_user(obj[6], f"r[{i}].user")
        record = _record(obj[7], f"r[{i}].record")
        t_ms, metric, value, unit, sensor = _reading_to_obj(Reading(*obj[:5]), i, v)
        return Reading(t_ms, metric, value, unit, sensor, flags, user, record)
    t_ms, metric, value, unit, sensor = _reading_to_obj(Reading(*obj), i, v)
    return Reading(t_ms=t_ms, metric=metric, value=value, unit=unit, sensor=sensor)


def _gap_to_obj(gap: Gap, i: int, v: int) -> list[Any]:
    where = f"gaps[{i}]"
    obj: list[Any] = [
        int_field(gap.from_ms, f"{where}.from_ms"),
        int_field(gap.to_ms, f"{where}.to_ms"),
        text(gap.reason, f"{where}.reason", MAX_GAP_REASON_BYTES),
    ]
    if gap.sensor is not None:
        if v < 2:
            raise EnvelopeError(Reason.MALFORMED, f"{where}: a gap's sensor needs protocol v2")
        obj.append(text(gap.sensor, f"{where}.sensor", MAX_SENSOR_BYTES))
    return obj


def _gap_from_obj(obj: object, i: int, v: int) -> Gap:
    lengths = (3, 4) if v >= 2 else (3,)
    if not isinstance(obj, list) or len(obj) not in lengths:
        shape = "[from_ms, to_ms, reason" + (", sensor]" if v >= 2 else "]")
        raise EnvelopeError(Reason.MALFORMED, f"gaps[{i}] must be {shape}")
    return Gap(*_gap_to_obj(Gap(*obj), i, v))


def _check_version(obj: dict[Any, Any]) -> int:
    """The payload's version, if this codec reads it."""
    if "v" not in obj:
        raise EnvelopeError(Reason.MALFORMED, "missing v")
    v = obj["v"]
    if not is_int(v):
        raise EnvelopeError(Reason.MALFORMED, "v must be an integer")
    if v not in PROTOCOL_VERSIONS:
        raise EnvelopeError(Reason.UNSUPPORTED_VERSION, f"v={v}, this gateway speaks {_SPOKEN}")
    return int(v)
