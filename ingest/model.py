"""Values that cross the wire between hub and gateway, and the reasons data is refused.

Times are integer milliseconds since the Unix epoch (UTC) everywhere on the wire and in the
pipeline; conversion to ``datetime`` happens at the storage boundary only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

# The payload version a hub seals, and those a gateway reads (docs/protocol.md section 8).
PROTOCOL_VERSION = 3
PROTOCOL_VERSIONS = (1, 2, 3)
# A device's user index (Blood Pressure, Weight Scale, Body Composition: uint8; 255 is the
# profiles' "unknown user").
MAX_DEVICE_USER = 255
UNKNOWN_DEVICE_USER = 255


class Reason(StrEnum):
    """Why an envelope or a reading was not stored. Stable codes: they are stored and shown."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_REVOKED = "device_revoked"
    BAD_SIGNATURE = "bad_signature"
    TOPIC_MISMATCH = "topic_mismatch"
    DUPLICATE = "duplicate"
    # A device record (a meter's stored record, by its key) the participant already has.
    DUPLICATE_RECORD = "duplicate_record"
    # A shared wearable's reading of another of its users than the participant's.
    OTHER_USER = "other_user"
    NO_CONSENT = "no_consent"
    SCOPE_NOT_CONSENTED = "scope_not_consented"
    RECONSENT_REQUIRED = "reconsent_required"
    IMPLAUSIBLE_TIME = "implausible_time"
    IMPLAUSIBLE_VALUE = "implausible_value"
    UNKNOWN_METRIC = "unknown_metric"
    WRONG_UNIT = "wrong_unit"
    STORAGE_REFUSED = "storage_refused"
    # A reading of a period its study has locked (held for an unlock where the study says).
    PERIOD_LOCKED = "period_locked"
    # Handling the message failed every time it was tried, with no cause found in its data.
    POISON = "poison"


class Reading(NamedTuple):
    """One measurement as carried in an envelope:
    ``[t_ms, metric, value, unit, sensor]``, or in v2 with the device's own statement about
    it, ``[t_ms, metric, value, unit, sensor, flags, user, record]``.

    ``flags`` are the device's quality and context statements, sorted (``invalid_measurement``,
    ``no_sensor_contact``, ``cuff_loose``, ``site_armpit``...: ingest.flags is their
    registry); ``user`` is the device's user index on a shared wearable, None when the
    profile has none; ``record`` is the device's own identity of a stored record (a glucose
    meter's record: its sequence number and time), by which the gateway stores it once.

    A named tuple rather than a frozen dataclass: the gateway builds one per reading it
    receives, and a tuple is built from the decoded CBOR array in one step, about 3x faster
    than a frozen dataclass's ``__init__``.
    """

    t_ms: int
    metric: str
    value: float
    unit: str
    sensor: str
    flags: tuple[str, ...] = ()
    user: int | None = None
    record: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """A span with no data and why (``out_of_range``, ``clock_jump``...): absence made visible.
    ``sensor``: the wearable it concerns (v2), None for the whole hub (its clock, its outbox)."""

    from_ms: int
    to_ms: int
    reason: str
    sensor: str | None = None


@dataclass(frozen=True, slots=True)
class SensorReport:
    """What a wearable says about itself (Device Information, Battery): the provenance of
    the readings that carry its ``sensor`` name. Fields it does not serve are None.
    ``paired_user`` is the hub's, not the wearable's: whose readings it may store."""

    sensor: str
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None
    firmware: str | None = None
    hardware: str | None = None
    battery_level: int | None = None
    # The user index the participant has on a shared wearable (v2), as the hub paired it;
    # None for a wearable that is not shared. Readings of other users are refused.
    paired_user: int | None = None


@dataclass(frozen=True, slots=True)
class ZoneReport:
    """The hub's local time zone (v3): an IANA name, in force on the hub since ``since_ms``
    (the hub's clock when it first saw it). Sent after the hub starts and when it changes."""

    time_zone: str
    since_ms: int


@dataclass(frozen=True, slots=True)
class Payload:
    """The signed content of one envelope."""

    dev: str
    seq: int
    sent_ms: int
    readings: tuple[Reading, ...]
    gaps: tuple[Gap, ...] = ()
    v: int = PROTOCOL_VERSION
    sensors: tuple[SensorReport, ...] = ()
    zone: ZoneReport | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """The gateway's answer to one envelope, sent after COMMIT on ``dct/v1/{dev}/down``.

    ``status`` is ``accepted`` (stored now or earlier: a replay is receipted again) or
    ``rejected`` (with ``reason``: the hub stops retrying it). ``stored`` counts the readings
    of this envelope that are in the database; ``refused`` those that were refused with a
    rejection row (for example outside consent).
    """

    dev: str
    seq: int
    status: str
    stored: int
    refused: int
    at_ms: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Readings of one envelope refused together, for one reason (and metric when it matters)."""

    reason: Reason
    count: int
    first_ms: int
    last_ms: int
    metric: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AcceptedEnvelope:
    """A verified envelope: its readings to store, those refused and why, and its gaps.

    ``consent_ids[i]`` is the consent record that allowed ``readings[i]`` (provenance).
    ``original`` is the envelope as received, signature and all: kept so that each stored
    reading can be checked against what the hub signed (source data verification).
    """

    dev: str
    seq: int
    participant_id: str
    sent_ms: int
    envelope_sha256: bytes
    reading_count: int
    readings: tuple[Reading, ...]
    consent_ids: tuple[int | None, ...]
    refusals: tuple[Refusal, ...] = ()
    gaps: tuple[Gap, ...] = ()
    sensors: tuple[SensorReport, ...] = ()
    original: bytes = b""
    zone: ZoneReport | None = None


@dataclass(frozen=True, slots=True)
class RejectedEnvelope:
    """An envelope refused whole (unverifiable, unknown device, ...): nothing of it is stored.

    Device and seq are what the envelope claimed, when it could be read that far.
    """

    reason: Reason
    detail: str
    topic: str
    envelope_sha256: bytes
    dev: str | None = None
    seq: int | None = None
    participant_id: str | None = None
    reading_count: int = 0
    first_ms: int | None = None
    last_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """What one database transaction stores."""

    accepted: tuple[AcceptedEnvelope, ...]
    rejected: tuple[RejectedEnvelope, ...]
    received_ms: int
