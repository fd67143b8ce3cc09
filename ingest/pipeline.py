"""The ingest stages, sans I/O. The gateway calls them in this order for each message:

1. ``decode``: topic, size limit, CBOR and schema, ``dev`` equals the topic's device and the
   key id (reasons ``malformed``, ``too_large``, ``unsupported_version``, ``topic_mismatch``);
2. ``verify``: the device is known and not revoked, and its key verifies the signature
   (``unknown_device``, ``device_revoked``, ``bad_signature``); CPU-bound, run in an executor.
   The signature may be checked ahead (``check_signature``, with the key the device had in
   an earlier batch); ``verify`` uses that result only when the key is the one the device
   record of this batch holds;
3. ``admit``: per reading, whose it is (a shared wearable's reading of another of its users
   is ``other_user``), plausibility (known metric, canonical unit, finite value within
   physical bounds, time neither far in the future nor before the participant's enrollment)
   then the consent gate by the reading's own time (``no_consent``, ``scope_not_consented``).
   The common case is decided per envelope (see ``_admit_whole``), with the same outcome.

Deduplication by ``(device, seq)`` happens in the database transaction (storage.writer),
where it is exact. Every stage returns what it keeps and, for the rest, a reason: nothing
is dropped without one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from consent.gate import ConsentSnapshot
from ingest.envelope import Opened, open_envelope
from ingest.envelope import verify as verify_signature
from ingest.metrics import METRICS
from ingest.model import (
    AcceptedEnvelope,
    Gap,
    Payload,
    Reading,
    Reason,
    Refusal,
    RejectedEnvelope,
)

# The topic names live in ingest.topics (the hub needs them without the consent gate);
# re-exported here, where the server's modules and tests have always found them.
from ingest.topics import TOPIC_PREFIX as TOPIC_PREFIX
from ingest.topics import UP_SUFFIX as UP_SUFFIX
from ingest.topics import down_topic as down_topic
from ingest.topics import topic_device as topic_device
from ingest.topics import up_topic as up_topic
from ingest.wire import EnvelopeError

# Hub clocks drift and are set from the phone or NTP; five minutes ahead of the gateway's
# clock is already wrong, and 2099 certainly is.
FUTURE_SKEW_MS = 5 * 60_000
# How far back a hub may deliver data when its study sets nothing else (studies.backfill_days):
# a hub offline for weeks, a glucose meter's memory of months. Older is a broken clock.
DEFAULT_BACKFILL_MS = 365 * 86_400_000


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    data: bytes
    received_ms: int


@dataclass(frozen=True, slots=True)
class Decoded:
    inbound: Inbound
    opened: Opened
    envelope_sha256: bytes


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    participant_id: str
    public_key: ec.EllipticCurvePublicKey
    participant_enrolled_ms: int
    revoked: bool
    # The study's backfill horizon: data older than this before the receipt is refused.
    backfill_ms: int = DEFAULT_BACKFILL_MS
    # Sensor name -> the participant's user index on that shared wearable, as the hub's
    # latest stored report paired it (wearables that are not shared are absent).
    paired_users: Mapping[str, int] = field(default_factory=dict)

    def paired_with(self, payload: Payload) -> Mapping[str, int]:
        """The paired users in force for ``payload``: its own sensor reports (a v2 report
        says the pairing whole, None for a wearable that is not shared) over the stored."""
        if not payload.sensors:
            return self.paired_users
        paired = dict(self.paired_users)
        for report in payload.sensors:
            if report.paired_user is None:
                paired.pop(report.sensor, None)
            else:
                paired[report.sensor] = report.paired_user
        return paired

    def window(self, now_ms: int) -> tuple[int, int]:
        """The times (inclusive) this device's data may carry when received at ``now_ms``:
        not before the participant's enrollment nor the study's backfill horizon, and not
        ahead of the gateway's clock by more than the allowed skew. Always inside what
        PostgreSQL and ``datetime`` can hold, so a time inside it converts safely."""
        return max(self.participant_enrolled_ms, now_ms - self.backfill_ms), now_ms + FUTURE_SKEW_MS


def _rejected(
    inbound: Inbound,
    digest: bytes,
    reason: Reason,
    detail: str,
    decoded: Decoded | None = None,
    participant_id: str | None = None,
) -> RejectedEnvelope:
    if decoded is None:
        return RejectedEnvelope(
            reason, detail, inbound.topic, digest, dev=topic_device(inbound.topic)
        )
    p = decoded.opened.payload
    times = [r.t_ms for r in p.readings]
    return RejectedEnvelope(
        reason,
        detail,
        inbound.topic,
        digest,
        dev=p.dev,
        seq=p.seq,
        participant_id=participant_id,
        reading_count=len(p.readings),
        first_ms=min(times, default=None),
        last_ms=max(times, default=None),
    )


def decode(inbound: Inbound) -> Decoded | RejectedEnvelope:
    digest = hashlib.sha256(inbound.data).digest()
    topic_dev = topic_device(inbound.topic)
    if topic_dev is None:
        return _rejected(
            inbound, digest, Reason.MALFORMED, f"not an uplink topic: {inbound.topic!r}"
        )
    try:
        opened = open_envelope(inbound.data)
    except EnvelopeError as exc:
        return _rejected(inbound, digest, exc.reason, exc.detail)
    decoded = Decoded(inbound, opened, digest)
    if opened.payload.dev != topic_dev or opened.kid != topic_dev:
        return _rejected(
            inbound,
            digest,
            Reason.TOPIC_MISMATCH,
            f"topic device {topic_dev!r}, envelope dev {opened.payload.dev!r}, kid {opened.kid!r}",
            decoded,
        )
    return decoded


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """The outcome of checking an envelope's signature with ``key``: None or the error."""

    key: ec.EllipticCurvePublicKey
    error: EnvelopeError | None


def check_signature(decoded: Decoded, key: ec.EllipticCurvePublicKey) -> SignatureCheck:
    try:
        verify_signature(decoded.opened, key)
    except EnvelopeError as exc:
        return SignatureCheck(key, exc)
    return SignatureCheck(key, None)


def verify(
    decoded: Decoded, device: DeviceRecord | None, checked: SignatureCheck | None = None
) -> RejectedEnvelope | None:
    """None when the envelope is authentic and its device may send; else the rejection.

    ``checked``: a signature check made ahead; used only if made with the very key object of
    ``device`` (keys are parsed once per DER encoding, so the same key is the same object).
    """
    dev = decoded.opened.payload.dev
    if device is None:
        return _rejected(
            decoded.inbound,
            decoded.envelope_sha256,
            Reason.UNKNOWN_DEVICE,
            f"device {dev!r} is not enrolled",
            decoded,
        )
    if device.revoked:
        return _rejected(
            decoded.inbound,
            decoded.envelope_sha256,
            Reason.DEVICE_REVOKED,
            f"device {dev!r} is revoked",
            decoded,
            device.participant_id,
        )
    if checked is None or checked.key is not device.public_key:
        checked = check_signature(decoded, device.public_key)
    if checked.error is not None:
        return _rejected(
            decoded.inbound,
            decoded.envelope_sha256,
            checked.error.reason,
            checked.error.detail,
            decoded,
            device.participant_id,
        )
    return None


def _whose(r: Reading, paired: Mapping[str, int]) -> tuple[Reason, str] | None:
    """``other_user`` for a shared wearable's reading that is not the participant's: another
    user's, or one the device could not attribute (user 255, "unknown user")."""
    expected = paired.get(r.sensor)
    if r.user is None or expected is None or r.user == expected:
        return None
    return (
        Reason.OTHER_USER,
        f"{r.sensor} is paired for device user {expected}; this reading is device user {r.user}",
    )


def _plausibility(
    r: Reading, device: DeviceRecord, window: tuple[int, int]
) -> tuple[Reason, str] | None:
    metric = METRICS.get(r.metric)
    if metric is None:
        return Reason.UNKNOWN_METRIC, f"unknown metric {r.metric!r}"
    if r.unit != metric.unit:
        return Reason.WRONG_UNIT, f"{r.metric} must be in {metric.unit!r}, got {r.unit!r}"
    if not math.isfinite(r.value) or not metric.low <= r.value <= metric.high:
        return Reason.IMPLAUSIBLE_VALUE, f"{r.metric} outside {metric.low}..{metric.high}"
    return _time_problem(r.t_ms, "reading", device, window)


def _time_problem(
    t_ms: int, what: str, device: DeviceRecord, window: tuple[int, int]
) -> tuple[Reason, str] | None:
    """Why ``t_ms`` lies outside ``window`` (``DeviceRecord.window``), or None."""
    earliest, latest = window
    if t_ms > latest:
        return Reason.IMPLAUSIBLE_TIME, f"{what} time is in the future"
    if t_ms < earliest:
        if t_ms < device.participant_enrolled_ms:
            return Reason.IMPLAUSIBLE_TIME, f"{what} time is before the participant's enrollment"
        return Reason.IMPLAUSIBLE_TIME, f"{what} time is older than the study's backfill horizon"
    return None


def _admit_whole(
    readings: tuple[Reading, ...],
    device: DeviceRecord,
    consent: ConsentSnapshot,
    window: tuple[int, int],
) -> tuple[int | None, ...] | None:
    """The consent ids of ``readings`` when every one of them is plausible and consented;
    None when any is not (the caller then judges reading by reading).

    Consent is decided at the earliest and the latest reading time of each metric's scope:
    when both are allowed by the same consent record, so is every time between. A consent
    record's scopes only shrink over time (``withdraw_scope``, and a purge shrinks earlier
    states too), its id never comes back once another state followed, and a re-consent
    deadline, once passed, stays passed (consent.gate).
    """
    by_metric: dict[str, list[Reading]] = {}
    for r in readings:
        if r.user is not None:  # whose it is is judged reading by reading
            return None
        group = by_metric.get(r.metric)
        if group is None:
            by_metric[r.metric] = [r]
        else:
            group.append(r)
    earliest_ok, latest_ok = window
    consent_of: dict[str, int | None] = {}
    for name, group in by_metric.items():
        metric = METRICS.get(name)
        if metric is None:
            return None
        lo, hi, unit = metric.low, metric.high, metric.unit
        first = last = group[0].t_ms
        for r in group:
            # NaN fails both comparisons, so it falls to the reading-by-reading path.
            if r.unit != unit or not lo <= r.value <= hi:
                return None
            t = r.t_ms
            if t < first:
                first = t
            elif t > last:
                last = t
        if first < earliest_ok or last > latest_ok:
            return None
        at_first = consent.decide(device.participant_id, metric.scope, first)
        if not at_first.allowed:
            return None
        if last != first:
            at_last = consent.decide(device.participant_id, metric.scope, last)
            if not at_last.allowed or at_last.consent_id != at_first.consent_id:
                return None
        consent_of[name] = at_first.consent_id
    if len(consent_of) == 1:
        (only,) = consent_of.values()
        return (only,) * len(readings)
    return tuple(consent_of[r.metric] for r in readings)


def admit(
    decoded: Decoded, device: DeviceRecord, consent: ConsentSnapshot, now_ms: int
) -> AcceptedEnvelope | RejectedEnvelope:
    """Split a verified envelope's readings into those stored and those refused, with reasons.

    Every time the envelope carries is judged against the device's window before anything
    converts it: a ``sent`` time outside it refuses the whole envelope (the hub's clock is
    wrong), a reading or gap outside it is refused on its own (``implausible_time``).
    """
    payload = decoded.opened.payload
    window = device.window(now_ms)
    problem = _time_problem(payload.sent_ms, "sent", device, window)
    if problem is not None:
        return _rejected(
            decoded.inbound,
            decoded.envelope_sha256,
            problem[0],
            problem[1],
            decoded,
            device.participant_id,
        )
    gaps, gap_refusals = _judge_gaps(payload.gaps, device, window)
    whole = _admit_whole(payload.readings, device, consent, window)
    if whole is not None:
        return AcceptedEnvelope(
            dev=payload.dev,
            seq=payload.seq,
            participant_id=device.participant_id,
            sent_ms=payload.sent_ms,
            envelope_sha256=decoded.envelope_sha256,
            reading_count=len(payload.readings),
            readings=payload.readings,
            consent_ids=whole,
            refusals=gap_refusals,
            gaps=gaps,
            sensors=payload.sensors,
            original=decoded.inbound.data,
            zone=payload.zone,
        )
    return _admit_each(decoded, device, consent, window, gaps, gap_refusals)


def _judge_gaps(
    gaps: tuple[Gap, ...], device: DeviceRecord, window: tuple[int, int]
) -> tuple[tuple[Gap, ...], tuple[Refusal, ...]]:
    """The gaps inside ``window`` (and in order), and a refusal (of no reading) for each other."""
    if not gaps:
        return gaps, ()
    earliest, latest = window
    if all(earliest <= g.from_ms <= g.to_ms <= latest for g in gaps):
        return gaps, ()
    kept: list[Gap] = []
    refusals: list[Refusal] = []
    for g in gaps:
        problem = _time_problem(g.from_ms, "gap", device, window) or _time_problem(
            g.to_ms, "gap", device, window
        )
        if problem is None and g.from_ms > g.to_ms:
            problem = (Reason.IMPLAUSIBLE_TIME, "gap ends before it starts")
        if problem is None:
            kept.append(g)
        else:
            refusals.append(Refusal(problem[0], 0, g.from_ms, g.to_ms, None, problem[1]))
    return tuple(kept), tuple(refusals)


def _admit_each(
    decoded: Decoded,
    device: DeviceRecord,
    consent: ConsentSnapshot,
    window: tuple[int, int],
    gaps: tuple[Gap, ...],
    gap_refusals: tuple[Refusal, ...],
) -> AcceptedEnvelope:
    """``admit`` reading by reading: each judged on its own, refusals grouped by reason."""
    payload = decoded.opened.payload
    paired = device.paired_with(payload)
    kept: list[Reading] = []
    consent_ids: list[int | None] = []
    refused: dict[tuple[Reason, str | None], list[int]] = {}
    details: dict[tuple[Reason, str | None], str] = {}
    for r in payload.readings:
        problem = _whose(r, paired) or _plausibility(r, device, window)
        if problem is None:
            decision = consent.decide(device.participant_id, METRICS[r.metric].scope, r.t_ms)
            if decision.allowed:
                kept.append(r)
                consent_ids.append(decision.consent_id)
                continue
            assert decision.reason is not None
            problem = (decision.reason, f"{r.metric} not covered by consent at reading time")
        key = (problem[0], r.metric if problem[0] is not Reason.UNKNOWN_METRIC else None)
        refused.setdefault(key, []).append(r.t_ms)
        details.setdefault(key, problem[1])
    return AcceptedEnvelope(
        dev=payload.dev,
        seq=payload.seq,
        participant_id=device.participant_id,
        sent_ms=payload.sent_ms,
        envelope_sha256=decoded.envelope_sha256,
        reading_count=len(payload.readings),
        readings=tuple(kept),
        consent_ids=tuple(consent_ids),
        refusals=_refusals(refused, details) + gap_refusals,
        gaps=gaps,
        sensors=payload.sensors,
        original=decoded.inbound.data,
        zone=payload.zone,
    )


def _refusals(
    refused: dict[tuple[Reason, str | None], list[int]],
    details: dict[tuple[Reason, str | None], str],
) -> tuple[Refusal, ...]:
    return tuple(
        Refusal(reason, len(times), min(times), max(times), metric, details[(reason, metric)])
        for (reason, metric), times in refused.items()
    )


def devices_of(items: Iterable[Decoded]) -> set[str]:
    return {d.opened.payload.dev for d in items}
