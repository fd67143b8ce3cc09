"""The API's site and participant operations: sites, participants, enrollment codes,
readings and rollups."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web
from psycopg import errors as pg_errors

from consent import records
from gateway import enrollment
from gateway.web import live, qr
from gateway.web.access import (
    CLINICAL,
    COORDINATION,
    EVERYONE,
    STAFF_AND_ADMIN,
    require_participant,
    require_site,
)
from gateway.web.api_common import (
    ID_PATTERN,
    PARTICIPANT_ID,
    TIME_ZONE_PATTERN,
    V1,
    actor_of,
    iso,
    pool_of,
    read_pool_of,
)
from gateway.web.errors import BadInput, Conflict
from gateway.web.schemas import (
    CODE,
    PARTICIPANT,
    PARTICIPANT_PAGE,
    READINGS,
    ROLLUPS,
    SITE,
    SITE_PAGE,
    arr,
    obj,
)
from gateway.web.spec import Ctx, Endpoint, Field
from ingest.metrics import METRICS
from storage import adherence, audit, registry, rollups, sensors, time_zones, views
from storage.timeconv import from_ms, to_ms

log = logging.getLogger(__name__)

METRIC_NAMES = tuple(sorted(METRICS))


# --- converters ---------------------------------------------------------------------------


def site_json(s: views.SiteRow) -> dict[str, Any]:
    return {
        "site_id": s.site_id,
        "study_id": s.study_id,
        "name": s.name,
        "participants": s.participants,
    }


def participant_json(p: views.ParticipantRow) -> dict[str, Any]:
    return {
        "participant_id": p.participant_id,
        "study_id": p.study_id,
        "site_id": p.site_id,
        "enrolled_at": iso(p.enrolled_at),
        "active_devices": p.active_devices,
        "last_received": iso(p.last_received),
        "consent": {
            "action": p.consent_action,
            "version": p.consent_version,
            "scopes": list(p.consent_scopes),
            "effective_at": iso(p.consent_effective_at),
        },
    }


def device_json(d: views.DeviceRow) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "enrolled_at": iso(d.enrolled_at),
        "revoked_at": iso(d.revoked_at),
        "revoked_reason": d.revoked_reason,
        "last_received": iso(d.last_received),
        "envelopes": d.envelopes,
        "readings_stored": d.readings_stored,
        "readings_refused": d.readings_refused,
        "sensors": [
            {
                "sensor": s.sensor,
                "manufacturer": s.manufacturer,
                "model": s.model,
                "firmware": s.firmware,
                "battery_level": s.battery_level,
                "first_seen": iso(s.first_seen),
                "last_seen": iso(s.last_reading),
                "last_report": iso(s.last_report),
            }
            for s in d.sensors
        ],
    }


def sensor_period_json(s: sensors.SensorPeriod) -> dict[str, Any]:
    return {
        "device_id": s.device_id,
        "sensor": s.sensor,
        "manufacturer": s.manufacturer,
        "model": s.model,
        "serial": s.serial,
        "firmware": s.firmware,
        "hardware": s.hardware,
        "reported_at": iso(s.reported_at),
        "valid_from": iso(s.valid_from),
        "valid_to": iso(s.valid_to),
    }


# --- handlers: sites and participants -------------------------------------------------------


async def list_sites(ctx: Ctx) -> web.StreamResponse:
    async with pool_of(ctx).connection() as conn:
        rows = await views.sites(conn, ctx.user.site_ids)
    return web.json_response({"sites": [site_json(s) for s in rows]})


def _adherence_today(day: date, d: adherence.ParticipantDay | None) -> dict[str, Any]:
    return {
        "day": day.isoformat(),
        "adherence": None if d is None else d.adherence,
        "metrics_expected": 0 if d is None else d.metrics_expected,
        "metrics_met": 0 if d is None else d.metrics_met,
    }


async def get_site(ctx: Ctx) -> web.StreamResponse:
    """The site, its cohort at a glance (each participant's consent, devices, newest
    reading, open alerts and queries, today's adherence), pending re-consents and enrollment
    codes. A fixed number of statements whatever the site's size. "Today" is the UTC date,
    as the adherence heat map's default span counts it."""
    site_id = ctx.path["site_id"]
    today = datetime.now(UTC).date()
    async with pool_of(ctx).connection() as conn:
        site = await require_site(ctx.user, site_id, conn)
        participants = await views.site_participants(conn, site_id)
        pids = [p.participant_id for p in participants]
        last_readings = await views.sensor_last_readings(conn, pids)
        devices = await views.devices_of(conn, pids, last_readings)
        newest = views.last_reading_of(last_readings)
        work = await views.open_work(conn, site_id)
        days = {d.participant_id: d for d in await adherence.cohort(conn, pids, today, today)}
        codes = await views.enrollment_codes(conn, site_id)
        await conn.commit()
        pending = await records.pending_reconsents(conn, actor_of(ctx.user), study_id=site.study_id)
    # Alerts are for clinical roles: a site coordinator sees no count of them either.
    sees_alerts = ctx.user.role in CLINICAL

    def cohort_json(p: views.ParticipantRow) -> dict[str, Any]:
        w = work.get(p.participant_id)
        return {
            **participant_json(p),
            "devices": [device_json(d) for d in devices[p.participant_id]],
            "last_reading": iso(newest.get(p.participant_id)),
            "unresolved_alerts": (0 if w is None else w.unresolved_alerts) if sees_alerts else None,
            "open_queries": 0 if w is None else w.open_queries,
            "answered_queries": 0 if w is None else w.answered_queries,
            "adherence_today": _adherence_today(today, days.get(p.participant_id)),
        }

    return web.json_response(
        {
            "site": site_json(site),
            "participants": [cohort_json(p) for p in participants],
            "pending_reconsents": [
                {
                    "participant_id": r.participant_id,
                    "current_version": r.current_version,
                    "required_version": r.required_version,
                    "reconsent_by": iso(r.reconsent_by),
                    "overdue": r.overdue,
                }
                for r in pending
                if r.site_id == site_id
            ],
            "enrollment_codes": [
                {
                    "participant_id": c.participant_id,
                    "created_by": c.created_by,
                    "created_at": iso(c.created_at),
                    "expires_at": iso(c.expires_at),
                    "used_at": iso(c.used_at),
                    "device_id": c.device_id,
                }
                for c in codes
            ],
        }
    )


async def create_participant(ctx: Ctx) -> web.StreamResponse:
    site_id = ctx.path["site_id"]
    pid = ctx.body["participant_id"]
    zone = ctx.body.get("time_zone")
    async with pool_of(ctx).connection() as conn:
        site = await require_site(ctx.user, site_id, conn)
        try:
            async with conn.transaction():
                await registry.create_participant(conn, pid, site.study_id, site_id)
                await audit.append(
                    conn,
                    actor=ctx.user.username,
                    action="participant.create",
                    entity="participant",
                    entity_id=pid,
                    detail={"site_id": site_id},
                )
                if zone is not None:
                    await time_zones.set_time_zone(
                        conn, pid, zone, datetime.now(UTC), actor=ctx.user.username
                    )
        except pg_errors.UniqueViolation as exc:
            raise Conflict(f"participant {pid!r} exists") from exc
        except time_zones.UnknownTimeZone as exc:
            raise BadInput(str(exc)) from exc
        row = await views.participant(conn, pid)
    assert row is not None
    log.info("participant created participant=%s site=%s by=%s", pid, site_id, ctx.user.username)
    return web.json_response(participant_json(row), status=201)


async def get_participant(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        row = await views.participant(conn, pid)
        assert row is not None
        devices = await views.devices(conn, pid)
        envelopes = await views.recent_envelopes(conn, pid)
        rejections = await views.recent_rejections(conn, pid)
        sensor_history = await sensors.participant_history(conn, pid)
        zones = await time_zones.history(conn, pid)
        await conn.commit()
        history = await records.history(conn, actor_of(ctx.user), pid)
    return web.json_response(
        {
            "participant": participant_json(row),
            "devices": [device_json(d) for d in devices],
            "envelopes": [
                {
                    "device_id": e.device_id,
                    "seq": e.seq,
                    "sent_at": iso(e.sent_at),
                    "received_at": iso(e.received_at),
                    "readings": e.reading_count,
                    "stored": e.stored_count,
                    "refused": e.refused_count,
                }
                for e in envelopes
            ],
            "rejections": [
                {
                    "received_at": iso(r.received_at),
                    "device_id": r.device_id,
                    "seq": r.seq,
                    "reason": r.reason,
                    "metric": r.metric,
                    "readings": r.reading_count,
                }
                for r in rejections
            ],
            "consents": [
                {
                    "consent_id": c.consent_id,
                    "document_id": c.document_id,
                    "version": c.version,
                    "action": c.action,
                    "scopes": sorted(c.scopes),
                    "signer_name": c.signer_name,
                    "signed_at": iso(c.signed_at),
                    "meaning": c.meaning,
                    "recorded_by": c.recorded_by,
                    "valid_from": iso(c.valid_from),
                    "valid_to": iso(c.valid_to),
                }
                for c in history
            ],
            "sensor_history": [sensor_period_json(s) for s in sensor_history],
            "time_zones": [{"time_zone": z.time_zone, "from": iso(z.set_from)} for z in zones],
        }
    )


async def create_enrollment_code(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        issued = await enrollment.issue_code(
            conn, pid, created_by=ctx.user.username, ttl=timedelta(hours=ctx.body["ttl_hours"])
        )
    # The gateway's configured public address, never the request's origin (behind a TLS
    # proxy that is the proxy's plain-http side), and the CA the hub must find there.
    from gateway.app import SETTINGS, STUDY_CA  # gateway.app imports this package

    app = ctx.request.app
    payload = enrollment.enrollment_uri(app[SETTINGS].gateway_url, issued.code, app[STUDY_CA])
    return web.json_response(
        {
            "code": issued.code,
            "participant_id": issued.participant_id,
            "study_id": issued.study_id,
            "expires_at": iso(issued.expires_at),
            "qr_payload": payload,
            "qr_svg": qr.svg(payload),
        },
        status=201,
    )


async def get_readings(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    after = ctx.query["received_after"]
    async with read_pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        body = await live.window(
            conn,
            pid,
            ctx.query["minutes"],
            metric=ctx.query["metric"],
            received_after=None if after is None else from_ms(after),
        )
    return web.json_response(body)


async def get_rollups(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    since = datetime.now(UTC) - timedelta(days=ctx.query["days"])
    metric = ctx.query["metric"]
    async with read_pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        rows = await rollups.hourly(conn, pid, since, metrics=None if metric is None else [metric])
    return web.json_response(
        {
            "participant_id": pid,
            "from": iso(since),
            "buckets": [
                {
                    "metric": r.metric,
                    "bucket": to_ms(r.bucket),
                    "n": r.n,
                    "mean": r.mean,
                    "min": r.min,
                    "max": r.max,
                }
                for r in rows
            ],
        }
    )


# --- the operations -----------------------------------------------------------------------

SITE_ID = Field("site_id", pattern=ID_PATTERN, max_len=64)
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        f"{V1}/sites",
        "list_sites",
        "List sites",
        list_sites,
        STAFF_AND_ADMIN,
        "sites",
        ok_schema=obj({"sites": arr(SITE)}),
    ),
    Endpoint(
        "GET",
        f"{V1}/sites/{{site_id}}",
        "get_site",
        "Show a site",
        get_site,
        STAFF_AND_ADMIN,
        "sites",
        path_params=(SITE_ID,),
        ok_schema=SITE_PAGE,
    ),
    Endpoint(
        "POST",
        f"{V1}/sites/{{site_id}}/participants",
        "create_participant",
        "Register a participant",
        create_participant,
        COORDINATION,
        "sites",
        path_params=(SITE_ID,),
        body=(
            Field("participant_id", pattern=ID_PATTERN, max_len=64),
            Field(
                "time_zone",
                required=False,
                pattern=TIME_ZONE_PATTERN,
                max_len=64,
                description="the participant's IANA time zone from now on, e.g. Europe/Berlin"
                " (default: none, which is UTC, until set or reported by the hub)",
            ),
        ),
        ok_status=201,
        ok_schema=PARTICIPANT,
        conflicts=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}",
        "get_participant",
        "Show a participant",
        get_participant,
        EVERYONE,
        "participants",
        path_params=(PARTICIPANT_ID,),
        ok_schema=PARTICIPANT_PAGE,
        audit_read=True,
    ),
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/enrollment-codes",
        "create_enrollment_code",
        "Make an enrollment code",
        create_enrollment_code,
        COORDINATION,
        "participants",
        path_params=(PARTICIPANT_ID,),
        body=(
            Field("ttl_hours", kind="integer", required=False, minimum=1, maximum=720, default=72),
        ),
        ok_status=201,
        ok_schema=CODE,
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/readings",
        "get_readings",
        "Read recent readings",
        get_readings,
        CLINICAL,
        "participants",
        path_params=(PARTICIPANT_ID,),
        query=(
            Field("metric", required=False, enum=METRIC_NAMES),
            Field("minutes", kind="integer", required=False, minimum=1, maximum=1440, default=10),
            Field(
                "received_after",
                kind="integer",
                required=False,
                minimum=0,
                maximum=253_402_300_799_999,  # 9999-12-31T23:59:59.999Z
                description="the previous answer's cursor: only readings received since then",
            ),
        ),
        ok_schema=READINGS,
        audit_read=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/readings/live",
        "follow_readings",
        "Follow readings live",
        live.live_readings,
        CLINICAL,
        "participants",
        path_params=(PARTICIPANT_ID,),
        query=(
            Field(
                "minutes",
                kind="integer",
                required=False,
                minimum=1,
                maximum=live.MAX_MINUTES,
                default=10,
            ),
        ),
        ok_content_type="text/event-stream",
        description="Server-sent events: `window` (the last `minutes` whole, as "
        "get_readings answers, again every minute), then `readings` (what the gateway stores "
        "as it arrives); `signed-out` or `forbidden` end the stream.",
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/rollups",
        "get_rollups",
        "Read hourly rollups",
        get_rollups,
        CLINICAL,
        "participants",
        path_params=(PARTICIPANT_ID,),
        query=(
            Field("metric", required=False, enum=METRIC_NAMES),
            Field("days", kind="integer", required=False, minimum=1, maximum=90, default=7),
        ),
        ok_schema=ROLLUPS,
        audit_read=True,
    ),
)
