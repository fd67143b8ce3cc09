"""Source data verification: each stored reading against the envelope its hub signed.

For every stored reading of a participant (in a time range): the envelope that carried it
must have its signed original kept, the original must hash to the digest recorded when it
was stored, open as an envelope and verify with its device's key, and carry a reading
equal to the stored one (time, metric, value, unit, sensor, flags, device user). Each
stored reading is matched to a signed one at most once, so a reading copied in the database
is found too. Anything else is a reading without a verifying source, and says why.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ingest import keys
from ingest.envelope import open_envelope, verify
from ingest.wire import EnvelopeError
from storage.originals import Original, OriginalError, StoredReading, decompress

# A reading as compared: what the hub signed of it, as the database keeps it.
_Key = tuple[int, str, float, str, str, tuple[str, ...], int | None]


class Finding(StrEnum):
    VERIFIED = "verified"
    # The envelope's original was not kept (older than the study's retention, or deleted
    # with a withdrawal's data, or stored before originals were kept).
    NO_ORIGINAL = "no_original"
    # The original does not hash to the digest recorded with the envelope, or is damaged.
    ORIGINAL_ALTERED = "original_altered"
    # The original's signature does not verify with its device's key.
    BAD_SIGNATURE = "bad_signature"
    # No reading the hub signed in that envelope equals the stored one.
    NOT_SIGNED = "not_signed"


@dataclass(frozen=True, slots=True)
class Checked:
    reading: StoredReading
    finding: Finding
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    checked: tuple[Checked, ...]

    @property
    def verified(self) -> int:
        return sum(1 for c in self.checked if c.finding is Finding.VERIFIED)

    @property
    def unverified(self) -> tuple[Checked, ...]:
        return tuple(c for c in self.checked if c.finding is not Finding.VERIFIED)

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.finding.value for c in self.checked))


def _key_of(r: StoredReading) -> _Key:
    return (
        r.t_ms,
        r.metric,
        r.value,
        r.unit,
        r.sensor,
        tuple(r.flags or ()),
        r.device_user,
    )


def _signed(original: Original) -> tuple[Counter[_Key] | None, Finding, str]:
    """The readings the hub signed in this envelope, or why there are none to trust."""
    if original.original is None or original.codec is None or original.size is None:
        return None, Finding.NO_ORIGINAL, "the envelope's original is not kept"
    try:
        data = decompress(original.codec, original.original, original.size)
    except OriginalError as exc:
        return None, Finding.ORIGINAL_ALTERED, str(exc)
    if hashlib.sha256(data).digest() != original.envelope_sha256:
        return None, Finding.ORIGINAL_ALTERED, "does not hash to the digest stored with it"
    try:
        opened = open_envelope(data)
        verify(opened, keys.public_key_from_der(original.public_key))
    except EnvelopeError as exc:
        return None, Finding.BAD_SIGNATURE, str(exc)
    except keys.KeyMaterialError as exc:  # a device key that does not load
        return None, Finding.BAD_SIGNATURE, f"device key: {exc}"
    return (
        Counter(
            (r.t_ms, r.metric, r.value, r.unit, r.sensor, r.flags, r.user)
            for r in opened.payload.readings
        ),
        Finding.VERIFIED,
        "",
    )


def check(readings: Sequence[StoredReading], originals: dict[tuple[str, int], Original]) -> Report:
    """Each of ``readings`` against the original of its envelope (see the module doc)."""
    signed: dict[tuple[str, int], tuple[Counter[_Key] | None, Finding, str]] = {}
    out: list[Checked] = []
    for r in readings:
        where = (r.device_id, r.seq)
        if where not in signed:
            original = originals.get(where)
            signed[where] = (
                (None, Finding.NO_ORIGINAL, "no envelope row")
                if original is None
                else _signed(original)
            )
        available, finding, detail = signed[where]
        if available is None:
            out.append(Checked(r, finding, detail))
            continue
        key = _key_of(r)
        if available[key] > 0:
            available[key] -= 1
            out.append(Checked(r, Finding.VERIFIED))
        else:
            out.append(
                Checked(r, Finding.NOT_SIGNED, f"not among the readings of {r.device_id}#{r.seq}")
            )
    return Report(tuple(out))
