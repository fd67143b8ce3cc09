"""Read queries behind the web pages and the API: sites, participants, devices, what was sent
and received, enrollment codes, alerts and users. A participant's readings and gaps are read by
``storage.reading_views``, consent documents by ``storage.consent_views``, hourly rollups
by ``storage.rollups``.

Nothing here decides who may see what (``gateway.web.access`` does); every function takes the
ids it is allowed to read. Values leave only as rows for the caller to return; nothing here
logs them.


Last seen: a wearable's "last seen" is its newest reading, by reading time, read from
``readings`` through the (participant, metric, time) index (:func:`sensor_last_readings`);
``sensors.last_seen`` is only when its hub last reported it (battery, description), which a
hub does on connecting, not with every reading.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from psycopg.rows import class_row

from ingest.metrics import METRICS
from storage.alerts import Alert, AlertEvent
from storage.db import Conn


@dataclass(frozen=True, slots=True)
class SiteRow:
    site_id: str
    study_id: str
    name: str
    participants: int


@dataclass(frozen=True, slots=True)
class ParticipantRow:
    participant_id: str
    study_id: str
    site_id: str
    enrolled_at: datetime
    active_devices: int
    last_received: datetime | None
    consent_action: str | None
    consent_version: str | None
    consent_scopes: tuple[str, ...]
    consent_effective_at: datetime | None


# How far back the pages look for a participant's latest readings ("last seen", an alert's
# current value, a site's "last data"). Partitions and TimescaleDB chunks are 7 days wide:
# a look back reads at most 5 of them per participant and metric.
RECENT_READINGS: Final = timedelta(days=30)
# A wearable's last reading is found among the newest this many readings of each of the
# participant's metrics (read newest first from readings_participant_metric_time): exact for
# every wearable with a reading among them, which misses only one whose readings are all of
# metrics another of the participant's wearables has sent this many of since (a replaced
# strap under a new name, after 500 s of its successor's 1 Hz stream).
LAST_SEEN_PER_METRIC: Final = 500


@dataclass(frozen=True, slots=True)
class SensorRow:
    """A wearable of a hub, with its last reading. ``last_reading``: the time of its newest
    stored reading (None: none recent, see :data:`LAST_SEEN_PER_METRIC`); ``first_seen`` and
    ``last_report``: when its hub first and last reported it (battery, description), which
    says nothing about its readings; None for a wearable known only by its readings (its hub
    never described it)."""

    sensor: str
    manufacturer: str | None
    model: str | None
    firmware: str | None
    battery_level: int | None
    first_seen: datetime | None
    last_report: datetime | None
    last_reading: datetime | None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    enrolled_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None
    last_received: datetime | None
    envelopes: int
    readings_stored: int
    readings_refused: int
    sensors: tuple[SensorRow, ...]


@dataclass(frozen=True, slots=True)
class EnvelopeRow:
    device_id: str
    seq: int
    sent_at: datetime
    received_at: datetime
    reading_count: int
    stored_count: int
    refused_count: int


@dataclass(frozen=True, slots=True)
class RejectionRow:
    received_at: datetime
    device_id: str | None
    seq: int | None
    reason: str
    metric: str | None
    reading_count: int


@dataclass(frozen=True, slots=True)
class EnrollmentCodeRow:
    participant_id: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    device_id: str | None


async def sites(conn: Conn, site_ids: Collection[str] | None) -> list[SiteRow]:
    """The sites named (None: every site), with their participant counts."""
    cur = await conn.execute(
        "SELECT s.site_id, s.study_id, s.name,"
        " (SELECT count(*) FROM participants p WHERE p.site_id = s.site_id)"
        " FROM sites s WHERE %(ids)s::text[] IS NULL OR s.site_id = ANY(%(ids)s)"
        " ORDER BY s.study_id, s.site_id",
        {"ids": None if site_ids is None else list(site_ids)},
    )
    return [SiteRow(str(a), str(b), str(c), int(d)) for a, b, c, d in await cur.fetchall()]


async def participant_home(conn: Conn, participant_id: str) -> tuple[str, str] | None:
    """``(study_id, site_id)`` of a participant, or None."""
    cur = await conn.execute(
        "SELECT study_id, site_id FROM participants WHERE participant_id = %s", (participant_id,)
    )
    row = await cur.fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


_PARTICIPANTS = """
SELECT p.participant_id, p.study_id, p.site_id, p.enrolled_at,
       (SELECT count(*) FROM devices d
        WHERE d.participant_id = p.participant_id AND d.revoked_at IS NULL),
       (SELECT max(e.received_at) FROM envelopes e WHERE e.participant_id = p.participant_id),
       c.action, c.version, c.scopes, c.effective_at
FROM participants p
LEFT JOIN LATERAL (
    SELECT c.action, d.version, c.scopes, c.effective_at
    FROM consents c JOIN consent_documents d USING (document_id)
    WHERE c.participant_id = p.participant_id AND c.effective_at <= now()
    ORDER BY c.effective_at DESC, c.consent_id DESC LIMIT 1
) c ON true
WHERE (%(site)s::text IS NULL OR p.site_id = %(site)s)
  AND (%(pid)s::text IS NULL OR p.participant_id = %(pid)s)
ORDER BY p.participant_id
"""


def _participant(row: Sequence[Any]) -> ParticipantRow:
    pid, study, site, enrolled, devices, last, action, version, scopes, eff = row
    return ParticipantRow(
        str(pid),
        str(study),
        str(site),
        enrolled,
        int(devices),
        last,
        action,
        version,
        tuple(sorted(scopes or ())),
        eff,
    )


async def site_participants(conn: Conn, site_id: str) -> list[ParticipantRow]:
    cur = await conn.execute(_PARTICIPANTS, {"site": site_id, "pid": None})
    return [_participant(r) for r in await cur.fetchall()]


async def participant(conn: Conn, participant_id: str) -> ParticipantRow | None:
    cur = await conn.execute(_PARTICIPANTS, {"site": None, "pid": participant_id})
    row = await cur.fetchone()
    return None if row is None else _participant(row)


@dataclass(frozen=True, slots=True)
class OpenWork:
    """What is still open about a participant: alerts not yet resolved (open or
    acknowledged), data queries awaiting the site's answer (``open``) and answered ones
    awaiting the monitor (``answered``)."""

    participant_id: str
    unresolved_alerts: int
    open_queries: int
    answered_queries: int


# Each count through its index (alerts_one_open, data_queries_participant).
_OPEN_WORK = """
SELECT p.participant_id,
       (SELECT count(*) FROM alerts a
        WHERE a.participant_id = p.participant_id AND a.state <> 'resolved') AS unresolved_alerts,
       (SELECT count(*) FROM data_queries q
        WHERE q.participant_id = p.participant_id AND q.state = 'open') AS open_queries,
       (SELECT count(*) FROM data_queries q
        WHERE q.participant_id = p.participant_id AND q.state = 'answered') AS answered_queries
FROM participants p
WHERE p.site_id = %(site)s
ORDER BY p.participant_id
"""


async def open_work(conn: Conn, site_id: str) -> dict[str, OpenWork]:
    """Every participant of the site with their unresolved alerts and open queries: one
    statement for the whole site."""
    async with conn.cursor(row_factory=class_row(OpenWork)) as cur:
        await cur.execute(_OPEN_WORK, {"site": site_id})
        return {w.participant_id: w for w in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class _HubRow:
    participant_id: str
    device_id: str
    enrolled_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None
    last_received: datetime | None
    envelopes: int
    readings_stored: int
    readings_refused: int


@dataclass(frozen=True, slots=True)
class _ReportedSensor:
    device_id: str
    sensor: str
    manufacturer: str | None
    model: str | None
    firmware: str | None
    battery_level: int | None
    first_seen: datetime
    last_report: datetime


@dataclass(frozen=True, slots=True)
class SensorLastReading:
    """The newest stored reading's time of one wearable (hub and sensor name) of a
    participant."""

    participant_id: str
    device_id: str
    sensor: str
    last_reading: datetime


_HUBS = """
SELECT d.participant_id, d.device_id, d.enrolled_at, d.revoked_at, d.revoked_reason,
       max(e.received_at) AS last_received, count(e.seq) AS envelopes,
       coalesce(sum(e.stored_count), 0) AS readings_stored,
       coalesce(sum(e.refused_count), 0) AS readings_refused
FROM devices d LEFT JOIN envelopes e ON e.device_id = d.device_id
WHERE d.participant_id = ANY(%(pids)s)
GROUP BY d.device_id
ORDER BY d.participant_id, d.enrolled_at, d.device_id
"""
_REPORTED_SENSORS = """
SELECT s.device_id, s.sensor, s.manufacturer, s.model, s.firmware, s.battery_level,
       s.first_seen, s.last_seen AS last_report
FROM sensors s JOIN devices d USING (device_id)
WHERE d.participant_id = ANY(%(pids)s)
ORDER BY s.device_id, s.sensor
"""
# Per participant and metric, the newest readings (the index readings_participant_metric_time
# read newest first, a few partitions at most), and the latest time per wearable among them.
_SENSOR_LAST_READINGS = """
SELECT p.participant_id, r.device_id, r.sensor, max(r.time) AS last_reading
FROM unnest(%(pids)s::text[]) AS p (participant_id)
CROSS JOIN unnest(%(metrics)s::text[]) AS m (metric)
CROSS JOIN LATERAL (
    SELECT device_id, sensor, time FROM readings
    WHERE participant_id = p.participant_id AND metric = m.metric
      AND time >= now() - %(lookback)s::interval
    ORDER BY time DESC
    LIMIT %(per_metric)s
) r
GROUP BY p.participant_id, r.device_id, r.sensor
ORDER BY p.participant_id, r.device_id, r.sensor
"""


async def sensor_last_readings(
    conn: Conn, participant_ids: Collection[str]
) -> list[SensorLastReading]:
    """When each wearable of ``participant_ids`` sent its newest reading (by reading time),
    within the last :data:`RECENT_READINGS`: one statement for all of them. A wearable with
    no reading there is left out, and so (rarely) is one whose every reading lies behind
    :data:`LAST_SEEN_PER_METRIC` newer readings of the same metrics."""
    if not participant_ids:
        return []
    async with conn.cursor(row_factory=class_row(SensorLastReading)) as cur:
        await cur.execute(
            _SENSOR_LAST_READINGS,
            {
                "pids": list(participant_ids),
                "metrics": sorted(METRICS),
                "lookback": RECENT_READINGS,
                "per_metric": LAST_SEEN_PER_METRIC,
            },
        )
        return await cur.fetchall()


def last_reading_of(rows: Iterable[SensorLastReading]) -> dict[str, datetime]:
    """Each participant's newest reading time among ``rows``."""
    out: dict[str, datetime] = {}
    for r in rows:
        if r.participant_id not in out or r.last_reading > out[r.participant_id]:
            out[r.participant_id] = r.last_reading
    return out


async def devices_of(
    conn: Conn,
    participant_ids: Collection[str],
    last_readings: Iterable[SensorLastReading] | None = None,
) -> dict[str, list[DeviceRow]]:
    """The hubs of each of ``participant_ids`` (every one present, [] without hubs) with
    their wearables (battery, last report, last reading) and envelope counts: three
    statements whatever the number of participants, and a fourth unless ``last_readings``
    (what :func:`sensor_last_readings` answered for them) is given. A wearable that sent
    readings but was never described by its hub is listed with its sensor name only."""
    pids = list(participant_ids)
    async with conn.cursor(row_factory=class_row(_HubRow)) as cur:
        await cur.execute(_HUBS, {"pids": pids})
        hubs = await cur.fetchall()
    async with conn.cursor(row_factory=class_row(_ReportedSensor)) as cur:
        await cur.execute(_REPORTED_SENSORS, {"pids": pids})
        reported = await cur.fetchall()
    if last_readings is None:
        last_readings = await sensor_last_readings(conn, pids)
    # A hub belongs to one participant, so (hub, sensor) names a wearable.
    last = {(r.device_id, r.sensor): r.last_reading for r in last_readings}
    by_hub: dict[str, list[SensorRow]] = {}
    known = {(s.device_id, s.sensor) for s in reported}
    unreported = sorted(k for k in last if k not in known)
    for device_id, sensor in unreported:
        by_hub.setdefault(device_id, []).append(
            SensorRow(
                sensor=sensor,
                manufacturer=None,
                model=None,
                firmware=None,
                battery_level=None,
                first_seen=None,
                last_report=None,
                last_reading=last[(device_id, sensor)],
            )
        )
    for s in reported:
        by_hub.setdefault(s.device_id, []).append(
            SensorRow(
                sensor=s.sensor,
                manufacturer=s.manufacturer,
                model=s.model,
                firmware=s.firmware,
                battery_level=s.battery_level,
                first_seen=s.first_seen,
                last_report=s.last_report,
                last_reading=last.get((s.device_id, s.sensor)),
            )
        )
    out: dict[str, list[DeviceRow]] = {p: [] for p in pids}
    for h in hubs:
        out[h.participant_id].append(
            DeviceRow(
                device_id=h.device_id,
                enrolled_at=h.enrolled_at,
                revoked_at=h.revoked_at,
                revoked_reason=h.revoked_reason,
                last_received=h.last_received,
                envelopes=h.envelopes,
                readings_stored=h.readings_stored,
                readings_refused=h.readings_refused,
                sensors=tuple(sorted(by_hub.get(h.device_id, ()), key=lambda s: s.sensor)),
            )
        )
    return out


async def devices(conn: Conn, participant_id: str) -> list[DeviceRow]:
    """The participant's hubs with their wearables (battery, last report, last reading) and
    envelope counts."""
    return (await devices_of(conn, [participant_id]))[participant_id]


async def recent_envelopes(
    conn: Conn, participant_id: str, *, limit: int = 50
) -> list[EnvelopeRow]:
    cur = await conn.execute(
        "SELECT device_id, seq, sent_at, received_at, reading_count, stored_count, refused_count"
        " FROM envelopes WHERE participant_id = %s ORDER BY received_at DESC, seq DESC LIMIT %s",
        (participant_id, limit),
    )
    return [
        EnvelopeRow(str(d), int(s), sent, recv, int(n), int(st), int(rf))
        for d, s, sent, recv, n, st, rf in await cur.fetchall()
    ]


async def recent_rejections(
    conn: Conn, participant_id: str, *, limit: int = 50
) -> list[RejectionRow]:
    """Refusals of the participant's data: by participant, or by one of their hubs."""
    cur = await conn.execute(
        "SELECT received_at, device_id, seq, reason, metric, reading_count FROM rejections"
        " WHERE participant_id = %s OR device_id IN"
        " (SELECT device_id FROM devices WHERE participant_id = %s)"
        " ORDER BY received_at DESC, rejection_id DESC LIMIT %s",
        (participant_id, participant_id, limit),
    )
    return [
        RejectionRow(at, dev, None if seq is None else int(seq), str(reason), metric, int(n))
        for at, dev, seq, reason, metric, n in await cur.fetchall()
    ]


async def enrollment_codes(
    conn: Conn, site_id: str, *, limit: int = 100
) -> list[EnrollmentCodeRow]:
    """The site's enrollment codes, newest first (the codes themselves are never stored)."""
    cur = await conn.execute(
        "SELECT c.participant_id, c.created_by, c.created_at, c.expires_at, c.used_at,"
        " c.device_id FROM enrollment_codes c JOIN participants p USING (participant_id)"
        " WHERE p.site_id = %s ORDER BY c.created_at DESC LIMIT %s",
        (site_id, limit),
    )
    return [
        EnrollmentCodeRow(str(p), str(b), c, e, u, d) for p, b, c, e, u, d in await cur.fetchall()
    ]


async def last_alert_event_id(conn: Conn) -> int:
    cur = await conn.execute("SELECT coalesce(max(event_id), 0) FROM alert_events")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True, slots=True)
class AlertRow(Alert):
    """An alert with what opened it and the participant's latest reading of its metric.

    ``kind``, ``low``, ``high``, ``sustained_s``: the rule (rules are never edited, so these
    are the bounds and duration that opened it). ``value``: the reading that met the rule,
    at ``condition_time`` (none for missing data). ``latest_*``: the participant's newest
    reading of the metric within :data:`RECENT_READINGS` (all None without one); its
    ``latest_flags`` what the device said about it."""

    kind: str
    low: float | None
    high: float | None
    sustained_s: int
    value: float | None
    latest_time: datetime | None
    latest_value: float | None
    latest_unit: str | None
    latest_flags: list[str] | None


_ALERTS = """
SELECT a.alert_id, a.rule_id, r.name AS rule_name, r.metric, p.study_id, p.site_id,
       a.participant_id, a.state, a.severity, a.opened_at, a.first_time, a.condition_time,
       a.acknowledged_at, a.acknowledged_by, a.ack_note, a.resolved_at, a.resolved_by,
       a.resolve_note, a.cleared_time, a.escalated_at,
       r.kind, r.low, r.high, r.sustained_s, a.last_value AS value,
       latest.time AS latest_time, latest.value AS latest_value, latest.unit AS latest_unit,
       latest.flags AS latest_flags
FROM alerts a JOIN alert_rules r USING (rule_id)
JOIN participants p ON p.participant_id = a.participant_id
LEFT JOIN LATERAL (
    SELECT time, value, unit, coalesce(flags, '{}') AS flags FROM readings
    WHERE participant_id = a.participant_id AND metric = r.metric
      AND time >= now() - %(lookback)s::interval
    ORDER BY time DESC
    LIMIT 1
) latest ON true
WHERE p.site_id = ANY(%(sites)s)
  AND (%(severity)s::text IS NULL OR a.severity = %(severity)s)
  AND (%(states)s::text[] IS NULL OR a.state = ANY(%(states)s))
  AND (%(alerts)s::int8[] IS NULL OR a.alert_id = ANY(%(alerts)s))
ORDER BY a.alert_id DESC
LIMIT %(limit)s
"""


async def alerts(
    conn: Conn,
    site_ids: Collection[str],
    *,
    severity: str | None = None,
    states: Collection[str] | None = None,
    alert_ids: Collection[int] | None = None,
    limit: int = 500,
) -> list[AlertRow]:
    """Alerts of participants of ``site_ids``, newest first, with what opened them and the
    participant's latest reading of the metric (one index lookup per alert)."""
    async with conn.cursor(row_factory=class_row(AlertRow)) as cur:
        await cur.execute(
            _ALERTS,
            {
                "sites": list(site_ids),
                "severity": severity,
                "states": None if states is None else list(states),
                "alerts": None if alert_ids is None else list(alert_ids),
                "limit": limit,
                "lookback": RECENT_READINGS,
            },
        )
        return await cur.fetchall()


async def alert_history(conn: Conn, alert_id: int) -> list[AlertEvent]:
    cur = await conn.execute(
        "SELECT event_id, alert_id, event, at, actor, study_id, site_id, participant_id,"
        " rule_id, severity, detail FROM alert_events WHERE alert_id = %s ORDER BY event_id",
        (alert_id,),
    )
    return [
        AlertEvent(
            int(e),
            int(a),
            str(ev),
            at,
            str(actor),
            str(st),
            str(si),
            str(p),
            int(r),
            str(sev),
            dict(detail),
        )
        for e, a, ev, at, actor, st, si, p, r, sev, detail in await cur.fetchall()
    ]


@dataclass(frozen=True, slots=True)
class UserRow:
    username: str
    display_name: str
    role: str
    participant_id: str | None
    sites: tuple[str, ...]
    locked: bool
    disabled: bool
    created_at: datetime


async def user_list(conn: Conn) -> list[UserRow]:
    cur = await conn.execute(
        "SELECT u.username, u.display_name, u.role, u.participant_id,"
        " coalesce((SELECT array_agg(site_id ORDER BY site_id) FROM user_sites s"
        "  WHERE s.user_id = u.user_id), '{}'),"
        " coalesce(u.locked_until > now(), false), u.disabled_at IS NOT NULL, u.created_at"
        " FROM users u ORDER BY u.username"
    )
    return [
        UserRow(str(n), str(d), str(r), p, tuple(s), bool(lk), bool(dis), c)
        for n, d, r, p, s, lk, dis, c in await cur.fetchall()
    ]
