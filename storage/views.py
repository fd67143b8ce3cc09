"""Read queries behind the web pages and the API: sites, participants, devices, what was sent
and received, enrollment codes, hourly rollups, alerts and users. A participant's readings
and gaps are read by ``storage.reading_views``, consent documents by
``storage.consent_views``.

Nothing here decides who may see what (``gateway.web.access`` does); every function takes the
ids it is allowed to read. Values leave only as rows for the caller to return; nothing here
logs them.

Rollups: ``readings_1h`` holds hourly count/mean/min/max per participant and metric. On
TimescaleDB it is a continuous aggregate with real-time aggregation (its policy refreshes
it). On plain PostgreSQL it is a table that :func:`refresh_rollups` brings up to date: each
stored batch records its count, sum, minimum and maximum per participant, metric and hour in
``rollup_deltas``, and each withdrawal the hours it deleted readings from in
``rollup_invalidations`` (each in its own transaction, so none is missed however late it
commits); the refresh merges the first into their hours and recomputes exactly the second.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ingest.model import Reading
from storage.alerts import Alert, AlertEvent
from storage.db import Conn
from storage.migrate import StorageMode


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


@dataclass(frozen=True, slots=True)
class SensorRow:
    sensor: str
    manufacturer: str | None
    model: str | None
    firmware: str | None
    battery_level: int | None
    first_seen: datetime
    last_seen: datetime


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


@dataclass(frozen=True, slots=True)
class RollupRow:
    metric: str
    bucket: datetime
    n: int
    mean: float
    min: float
    max: float


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


async def devices(conn: Conn, participant_id: str) -> list[DeviceRow]:
    """The participant's hubs with their wearables (battery, last seen) and envelope counts."""
    cur = await conn.execute(
        "SELECT d.device_id, d.enrolled_at, d.revoked_at, d.revoked_reason,"
        " max(e.received_at), count(e.seq), coalesce(sum(e.stored_count), 0),"
        " coalesce(sum(e.refused_count), 0)"
        " FROM devices d LEFT JOIN envelopes e ON e.device_id = d.device_id"
        " WHERE d.participant_id = %s GROUP BY d.device_id ORDER BY d.enrolled_at, d.device_id",
        (participant_id,),
    )
    rows = await cur.fetchall()
    cur = await conn.execute(
        "SELECT s.device_id, s.sensor, s.manufacturer, s.model, s.firmware, s.battery_level,"
        " s.first_seen, s.last_seen FROM sensors s JOIN devices d USING (device_id)"
        " WHERE d.participant_id = %s ORDER BY s.device_id, s.sensor",
        (participant_id,),
    )
    by_device: dict[str, list[SensorRow]] = {}
    for dev, *rest in await cur.fetchall():
        sensor, manufacturer, model, firmware, battery, first, last = rest
        by_device.setdefault(str(dev), []).append(
            SensorRow(str(sensor), manufacturer, model, firmware, battery, first, last)
        )
    return [
        DeviceRow(
            str(dev),
            enrolled,
            revoked,
            reason,
            last,
            int(n),
            int(stored),
            int(refused),
            tuple(by_device.get(str(dev), ())),
        )
        for dev, enrolled, revoked, reason, last, n, stored, refused in rows
    ]


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


async def rollups(
    conn: Conn,
    participant_id: str,
    since: datetime,
    *,
    metrics: Collection[str] | None = None,
) -> list[RollupRow]:
    cur = await conn.execute(
        "SELECT metric, bucket, n, mean, min, max FROM readings_1h"
        " WHERE participant_id = %(pid)s AND bucket >= date_trunc('hour', %(since)s::timestamptz)"
        " AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))"
        " ORDER BY metric, bucket",
        {
            "pid": participant_id,
            "since": since,
            "metrics": None if metrics is None else list(metrics),
        },
    )
    return [
        RollupRow(str(m), b, int(n), float(mean), float(lo), float(hi))
        for m, b, n, mean, lo, hi in await cur.fetchall()
    ]


# An arbitrary, fixed key for pg_advisory_xact_lock: one rollup refresher at a time.
ROLLUP_LOCK_KEY = 0x726F_6C6C_7570

# One statement, so one snapshot: a batch's deltas and its readings are both seen or both
# not, and an hour recomputed from its readings never also gets the deltas of readings it
# already counted. Hours a withdrawal touched are recomputed (and dropped when left empty);
# every other hour merges what arrived since the last refresh into its row.
_REFRESH = """
WITH taken_deltas AS (
    DELETE FROM rollup_deltas RETURNING participant_ids, metrics, hours, counts, sums, mins, maxs
), deltas AS (
    SELECT u.participant_id, u.metric, to_timestamp(u.hour * 3600) AS bucket,
           sum(u.n)::bigint AS n, sum(u.total) AS total, min(u.lo) AS lo, max(u.hi) AS hi
    FROM taken_deltas,
        unnest(taken_deltas.participant_ids, taken_deltas.metrics, taken_deltas.hours,
               taken_deltas.counts, taken_deltas.sums, taken_deltas.mins, taken_deltas.maxs)
            AS u(participant_id, metric, hour, n, total, lo, hi)
    GROUP BY 1, 2, 3
), taken_invalidations AS (
    DELETE FROM rollup_invalidations RETURNING participant_ids, metrics, hours
), touched AS (
    SELECT DISTINCT u.participant_id, u.metric, to_timestamp(u.hour * 3600) AS bucket
    FROM taken_invalidations,
        unnest(taken_invalidations.participant_ids, taken_invalidations.metrics,
               taken_invalidations.hours) AS u(participant_id, metric, hour)
), fresh AS (
    SELECT t.participant_id, t.metric, t.bucket, count(r.value) AS n, avg(r.value) AS mean,
           min(r.value) AS min, max(r.value) AS max
    FROM touched t LEFT JOIN readings r ON r.participant_id = t.participant_id
        AND r.metric = t.metric AND r.time >= t.bucket AND r.time < t.bucket + interval '1 hour'
    GROUP BY t.participant_id, t.metric, t.bucket
), gone AS (
    DELETE FROM readings_1h h USING fresh f
    WHERE f.n = 0
      AND (h.participant_id, h.metric, h.bucket) = (f.participant_id, f.metric, f.bucket)
), recomputed AS (
    INSERT INTO readings_1h (participant_id, metric, bucket, n, mean, min, max)
    SELECT participant_id, metric, bucket, n, mean, min, max FROM fresh WHERE n > 0
    ON CONFLICT (participant_id, metric, bucket) DO UPDATE SET
        n = excluded.n, mean = excluded.mean, min = excluded.min, max = excluded.max
), merged AS (
    INSERT INTO readings_1h AS h (participant_id, metric, bucket, n, mean, min, max)
    SELECT d.participant_id, d.metric, d.bucket, d.n, d.total / d.n, d.lo, d.hi FROM deltas d
    WHERE NOT EXISTS (
        SELECT 1 FROM touched t
        WHERE (t.participant_id, t.metric, t.bucket) = (d.participant_id, d.metric, d.bucket))
    ON CONFLICT (participant_id, metric, bucket) DO UPDATE SET
        n = h.n + excluded.n,
        mean = (h.mean * h.n + excluded.mean * excluded.n) / (h.n + excluded.n),
        min = least(h.min, excluded.min),
        max = greatest(h.max, excluded.max)
    RETURNING 1
)
SELECT (SELECT count(*) FROM touched) + (SELECT count(*) FROM merged)
"""


HOUR_MS = 3_600_000

# (participant, metric, hour since the epoch) -> [count, sum, min, max] of a batch's readings.
HourPartials = dict[tuple[str, str, int], list[float]]


def add_to_partials(
    partials: HourPartials, participant_id: str, readings: Iterable[Reading]
) -> None:
    """Fold one participant's readings into ``partials``."""
    for t_ms, metric, value, *_ in readings:
        key = (participant_id, metric, t_ms // HOUR_MS)
        acc = partials.get(key)
        if acc is None:
            partials[key] = [1, value, value, value]
        else:
            acc[0] += 1
            acc[1] += value
            if value < acc[2]:
                acc[2] = value
            elif value > acc[3]:
                acc[3] = value


async def add_rollup_deltas(conn: Conn, partials: HourPartials) -> None:
    """Record what a batch adds to the hourly rollups, in the caller's transaction: the
    writer calls it with each batch it stores (plain mode)."""
    if partials:
        keys, accs = partials.keys(), partials.values()
        await conn.execute(
            "INSERT INTO rollup_deltas (participant_ids, metrics, hours, counts, sums, mins, maxs)"
            " VALUES (%b::text[], %b::text[], %b::int8[], %b::int8[], %b::float8[],"
            " %b::float8[], %b::float8[])",  # binary: see storage.writer
            (
                [k[0] for k in keys],
                [k[1] for k in keys],
                [k[2] for k in keys],
                [int(a[0]) for a in accs],
                [a[1] for a in accs],
                [a[2] for a in accs],
                [a[3] for a in accs],
            ),
        )


async def invalidate_rollups(
    conn: Conn, participant_ids: Sequence[str], metrics: Sequence[str], hours: Sequence[int]
) -> None:
    """Mark hours (since the epoch) of participants' metrics to be recomputed from their
    readings by the next refresh, in the caller's transaction."""
    if participant_ids:
        await conn.execute(
            "INSERT INTO rollup_invalidations (participant_ids, metrics, hours)"
            " VALUES (%b::text[], %b::text[], %b::int8[])",  # binary: see storage.writer
            (list(participant_ids), list(metrics), list(hours)),
        )


async def refresh_rollups(conn: Conn, mode: StorageMode) -> int:
    """Bring ``readings_1h`` up to date (plain mode; TimescaleDB refreshes its own): merge
    what batches added since the last refresh and recompute the hours withdrawals marked,
    in one transaction of its own. Returns the number of hours updated."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROLLUP_LOCK_KEY,))
        if mode is StorageMode.TIMESCALEDB:
            await conn.execute("DELETE FROM rollup_invalidations")
            await conn.execute("DELETE FROM rollup_deltas")
            return 0
        cur = await conn.execute(_REFRESH)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def last_alert_event_id(conn: Conn) -> int:
    cur = await conn.execute("SELECT coalesce(max(event_id), 0) FROM alert_events")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


_ALERTS = """
SELECT a.alert_id, a.rule_id, r.name, r.metric, p.study_id, p.site_id, a.participant_id,
       a.state, a.severity, a.opened_at, a.first_time, a.condition_time, a.acknowledged_at,
       a.acknowledged_by, a.ack_note, a.resolved_at, a.resolved_by, a.resolve_note,
       a.cleared_time, a.escalated_at
FROM alerts a JOIN alert_rules r USING (rule_id)
JOIN participants p ON p.participant_id = a.participant_id
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
) -> list[Alert]:
    """Alerts of participants of ``site_ids``, newest first."""
    cur = await conn.execute(
        _ALERTS,
        {
            "sites": list(site_ids),
            "severity": severity,
            "states": None if states is None else list(states),
            "alerts": None if alert_ids is None else list(alert_ids),
            "limit": limit,
        },
    )
    return [Alert(*row) for row in await cur.fetchall()]


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
