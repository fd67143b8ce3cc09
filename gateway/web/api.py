"""The versioned JSON API under ``/api/v1``: its operations and their handlers.

``ENDPOINTS`` is the one list: the router, the access checks and the OpenAPI document
(``GET /api/v1/openapi.json``) all come from it (``gateway.web.spec``). Handlers receive
checked parameters and check the site themselves (``gateway.web.access``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiohttp import web
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool

from consent import errors as consent_errors
from consent import records
from gateway import enrollment
from gateway.web import auth, live, qr, sse
from gateway.web.access import (
    ADMIN_ONLY,
    CLINICAL,
    COORDINATION,
    EVERYONE,
    STAFF_AND_ADMIN,
    Principal,
    require_participant,
    require_site,
    visible_sites,
)
from gateway.web.errors import BadInput, Conflict, Forbidden, NotFound, WebError
from gateway.web.exports import EXPORT_RUNNER
from gateway.web.ratelimit import check_request
from gateway.web.spec import Ctx, Endpoint, Field, openapi_document
from ingest.metrics import METRICS
from storage import alerts as alert_store
from storage import audit, registry, users, views
from storage.exports import errors as export_errors
from storage.exports import jobs
from storage.exports.selection import ExportKind, ExportRequest
from storage.exports.selection import participants as export_participants
from storage.timeconv import from_ms, to_ms

log = logging.getLogger(__name__)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# An ISO 8601 time with its zone (Z or an offset), as the exports need.
TIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
SEVERITIES = ("info", "warning", "critical")
STATES = ("open", "acknowledged", "resolved", "unresolved")
METRIC_NAMES = tuple(sorted(METRICS))


def _pool(ctx: Ctx) -> AsyncConnectionPool:
    return ctx.request.app[auth.POOL_KEY]


def _t(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _actor(p: Principal) -> records.Actor:
    return records.Actor.of(p.user)


# --- JSON schemas of the answers ----------------------------------------------------------

STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
NULL_TIME = {"type": "string", "format": "date-time", "nullable": True}
NULL_STR = {"type": "string", "nullable": True}
NULL_INT = {"type": "integer", "nullable": True}
BOOL = {"type": "boolean"}
STRS = {"type": "array", "items": STR}


def obj(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": sorted(props), "properties": props}


def arr(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


USER = obj(
    {
        "username": STR,
        "display_name": STR,
        "role": {"type": "string", "enum": [r.value for r in users.Role]},
        "participant_id": NULL_STR,
        "sites": STRS,
    }
)
SESSION = obj({"user": USER, "csrf_token": STR})
SITE = obj({"site_id": STR, "study_id": STR, "name": STR, "participants": INT})
SENSOR = obj(
    {
        "sensor": STR,
        "manufacturer": NULL_STR,
        "model": NULL_STR,
        "firmware": NULL_STR,
        "battery_level": NULL_INT,
        "first_seen": TIME,
        "last_seen": TIME,
    }
)
DEVICE = obj(
    {
        "device_id": STR,
        "enrolled_at": TIME,
        "revoked_at": NULL_TIME,
        "revoked_reason": NULL_STR,
        "last_received": NULL_TIME,
        "envelopes": INT,
        "readings_stored": INT,
        "readings_refused": INT,
        "sensors": arr(SENSOR),
    }
)
PARTICIPANT = obj(
    {
        "participant_id": STR,
        "study_id": STR,
        "site_id": STR,
        "enrolled_at": TIME,
        "active_devices": INT,
        "last_received": NULL_TIME,
        "consent": obj(
            {"action": NULL_STR, "version": NULL_STR, "scopes": STRS, "effective_at": NULL_TIME}
        ),
    }
)
RECONSENT = obj(
    {
        "participant_id": STR,
        "current_version": STR,
        "required_version": STR,
        "reconsent_by": TIME,
        "overdue": {"type": "boolean"},
    }
)
CODE_ROW = obj(
    {
        "participant_id": STR,
        "created_by": STR,
        "created_at": TIME,
        "expires_at": TIME,
        "used_at": NULL_TIME,
        "device_id": NULL_STR,
    }
)
SITE_PAGE = obj(
    {
        "site": SITE,
        "participants": arr(
            {
                **PARTICIPANT,
                "properties": {**PARTICIPANT["properties"], "devices": arr(DEVICE)},
                "required": sorted([*PARTICIPANT["required"], "devices"]),
            }
        ),
        "pending_reconsents": arr(RECONSENT),
        "enrollment_codes": arr(CODE_ROW),
    }
)
CONSENT_RECORD = obj(
    {
        "consent_id": INT,
        "document_id": INT,
        "version": STR,
        "action": STR,
        "scopes": STRS,
        "signer_name": NULL_STR,
        "signed_at": TIME,
        "meaning": NULL_STR,
        "recorded_by": STR,
        "valid_from": TIME,
        "valid_to": NULL_TIME,
    }
)
PARTICIPANT_PAGE = obj(
    {
        "participant": PARTICIPANT,
        "devices": arr(DEVICE),
        "envelopes": arr(
            obj(
                {
                    "device_id": STR,
                    "seq": INT,
                    "sent_at": TIME,
                    "received_at": TIME,
                    "readings": INT,
                    "stored": INT,
                    "refused": INT,
                }
            )
        ),
        "rejections": arr(
            obj(
                {
                    "received_at": TIME,
                    "device_id": NULL_STR,
                    "seq": NULL_INT,
                    "reason": STR,
                    "metric": NULL_STR,
                    "readings": INT,
                }
            )
        ),
        "consents": arr(CONSENT_RECORD),
    }
)
READINGS = obj(
    {
        "participant_id": STR,
        "from": TIME,
        "to": TIME,
        "cursor": INT,
        "readings": arr(
            obj(
                {
                    "t": INT,
                    "metric": STR,
                    "value": NUM,
                    "unit": STR,
                    "device_id": STR,
                    "sensor": STR,
                }
            )
        ),
        "gaps": arr(obj({"device_id": STR, "from": INT, "to": INT, "reason": STR})),
    }
)
ROLLUPS = obj(
    {
        "participant_id": STR,
        "from": TIME,
        "buckets": arr(
            obj({"metric": STR, "bucket": INT, "n": INT, "mean": NUM, "min": NUM, "max": NUM})
        ),
    }
)
ALERT = obj(
    {
        "alert_id": INT,
        "rule": STR,
        "metric": STR,
        "study_id": STR,
        "site_id": STR,
        "participant_id": STR,
        "state": STR,
        "severity": STR,
        "opened_at": TIME,
        "first_time": TIME,
        "acknowledged_at": NULL_TIME,
        "acknowledged_by": NULL_STR,
        "ack_note": NULL_STR,
        "resolved_at": NULL_TIME,
        "resolved_by": NULL_STR,
        "escalated_at": NULL_TIME,
    }
)
ALERT_EVENT = obj(
    {"event_id": INT, "event": STR, "at": TIME, "actor": STR, "detail": {"type": "object"}}
)
ALERT_LIST = obj({"alerts": arr(ALERT), "last_event_id": INT})
ALERT_PAGE = obj({"alert": ALERT, "events": arr(ALERT_EVENT)})
USER_ROW = obj(
    {
        **USER["properties"],
        "locked": {"type": "boolean"},
        "disabled": {"type": "boolean"},
        "created_at": TIME,
    }
)
CODE = obj(
    {
        "code": STR,
        "participant_id": STR,
        "study_id": STR,
        "expires_at": TIME,
        "qr_payload": STR,
        "qr_svg": STR,
    }
)
CONSENT_DOCUMENT = obj(
    {
        "document_id": INT,
        "title": STR,
        "version": STR,
        "language": STR,
        "text": NULL_STR,
        "uri": NULL_STR,
        "sha256": STR,
        "scopes": STRS,
        "optional_scopes": STRS,
        "effective_at": TIME,
        "signed": BOOL,
        "signed_scopes": STRS,
        "reconsent_by": NULL_TIME,
        "overdue": BOOL,
    }
)
CONSENT_DOCUMENTS = obj(
    {
        "participant_id": STR,
        "witness_required": BOOL,
        "in_force": {
            **obj({"consent_id": INT, "document_id": INT, "scopes": STRS}),
            "nullable": True,
        },
        "documents": arr(CONSENT_DOCUMENT),
    }
)
EXPORT_FILE = obj(
    {"index": INT, "path": STR, "sha256": STR, "bytes": INT, "rows": INT, "href": STR}
)
EXPORT_JOB = obj(
    {
        "job_id": STR,
        "kind": STR,
        "study_id": STR,
        "participant_id": NULL_STR,
        "from": NULL_TIME,
        "to": NULL_TIME,
        "requested_by": STR,
        "state": {"type": "string", "enum": [s.value for s in jobs.JobState]},
        "submitted_at": TIME,
        "started_at": NULL_TIME,
        "finished_at": NULL_TIME,
        "rows_written": INT,
        "error": NULL_STR,
        "files": arr(EXPORT_FILE),
    }
)


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
        "enrolled_at": _t(p.enrolled_at),
        "active_devices": p.active_devices,
        "last_received": _t(p.last_received),
        "consent": {
            "action": p.consent_action,
            "version": p.consent_version,
            "scopes": list(p.consent_scopes),
            "effective_at": _t(p.consent_effective_at),
        },
    }


def device_json(d: views.DeviceRow) -> dict[str, Any]:
    return {
        "device_id": d.device_id,
        "enrolled_at": _t(d.enrolled_at),
        "revoked_at": _t(d.revoked_at),
        "revoked_reason": d.revoked_reason,
        "last_received": _t(d.last_received),
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
                "first_seen": _t(s.first_seen),
                "last_seen": _t(s.last_seen),
            }
            for s in d.sensors
        ],
    }


def alert_json(a: alert_store.Alert) -> dict[str, Any]:
    return {
        "alert_id": a.alert_id,
        "rule": a.rule_name,
        "metric": a.metric,
        "study_id": a.study_id,
        "site_id": a.site_id,
        "participant_id": a.participant_id,
        "state": a.state,
        "severity": a.severity,
        "opened_at": _t(a.opened_at),
        "first_time": _t(a.first_time),
        "acknowledged_at": _t(a.acknowledged_at),
        "acknowledged_by": a.acknowledged_by,
        "ack_note": a.ack_note,
        "resolved_at": _t(a.resolved_at),
        "resolved_by": a.resolved_by,
        "escalated_at": _t(a.escalated_at),
    }


def event_json(e: alert_store.AlertEvent) -> dict[str, Any]:
    return {
        "event_id": e.event_id,
        "event": e.event,
        "at": _t(e.at),
        "actor": e.actor,
        "detail": dict(e.detail),
    }


# --- handlers: session ----------------------------------------------------------------------


async def login(ctx: Ctx) -> web.StreamResponse:
    return await auth.sign_in(ctx.request, ctx.body["username"], ctx.body["password"])


async def get_session(ctx: Ctx) -> web.StreamResponse:
    return web.json_response(
        {"user": auth.user_json(ctx.user.user), "csrf_token": ctx.user.csrf_token}
    )


async def logout(ctx: Ctx) -> web.StreamResponse:
    return await auth.sign_out(ctx.request, ctx.user)


# --- handlers: sites and participants -------------------------------------------------------


async def list_sites(ctx: Ctx) -> web.StreamResponse:
    async with _pool(ctx).connection() as conn:
        rows = await views.sites(conn, ctx.user.site_ids)
    return web.json_response({"sites": [site_json(s) for s in rows]})


async def get_site(ctx: Ctx) -> web.StreamResponse:
    site_id = ctx.path["site_id"]
    async with _pool(ctx).connection() as conn:
        site = await require_site(ctx.user, site_id, conn)
        participants = await views.site_participants(conn, site_id)
        devices = {
            p.participant_id: await views.devices(conn, p.participant_id) for p in participants
        }
        codes = await views.enrollment_codes(conn, site_id)
        await conn.commit()
        pending = await records.pending_reconsents(conn, _actor(ctx.user), study_id=site.study_id)
    return web.json_response(
        {
            "site": site_json(site),
            "participants": [
                {
                    **participant_json(p),
                    "devices": [device_json(d) for d in devices[p.participant_id]],
                }
                for p in participants
            ],
            "pending_reconsents": [
                {
                    "participant_id": r.participant_id,
                    "current_version": r.current_version,
                    "required_version": r.required_version,
                    "reconsent_by": _t(r.reconsent_by),
                    "overdue": r.overdue,
                }
                for r in pending
                if r.site_id == site_id
            ],
            "enrollment_codes": [
                {
                    "participant_id": c.participant_id,
                    "created_by": c.created_by,
                    "created_at": _t(c.created_at),
                    "expires_at": _t(c.expires_at),
                    "used_at": _t(c.used_at),
                    "device_id": c.device_id,
                }
                for c in codes
            ],
        }
    )


async def create_participant(ctx: Ctx) -> web.StreamResponse:
    site_id = ctx.path["site_id"]
    pid = ctx.body["participant_id"]
    async with _pool(ctx).connection() as conn:
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
        except pg_errors.UniqueViolation as exc:
            raise Conflict(f"participant {pid!r} exists") from exc
        row = await views.participant(conn, pid)
    assert row is not None
    log.info("participant created participant=%s site=%s by=%s", pid, site_id, ctx.user.username)
    return web.json_response(participant_json(row), status=201)


async def get_participant(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with _pool(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        row = await views.participant(conn, pid)
        assert row is not None
        devices = await views.devices(conn, pid)
        envelopes = await views.recent_envelopes(conn, pid)
        rejections = await views.recent_rejections(conn, pid)
        await conn.commit()
        history = await records.history(conn, _actor(ctx.user), pid)
    return web.json_response(
        {
            "participant": participant_json(row),
            "devices": [device_json(d) for d in devices],
            "envelopes": [
                {
                    "device_id": e.device_id,
                    "seq": e.seq,
                    "sent_at": _t(e.sent_at),
                    "received_at": _t(e.received_at),
                    "readings": e.reading_count,
                    "stored": e.stored_count,
                    "refused": e.refused_count,
                }
                for e in envelopes
            ],
            "rejections": [
                {
                    "received_at": _t(r.received_at),
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
                    "signed_at": _t(c.signed_at),
                    "meaning": c.meaning,
                    "recorded_by": c.recorded_by,
                    "valid_from": _t(c.valid_from),
                    "valid_to": _t(c.valid_to),
                }
                for c in history
            ],
        }
    )


async def create_enrollment_code(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with _pool(ctx).connection() as conn:
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
            "expires_at": _t(issued.expires_at),
            "qr_payload": payload,
            "qr_svg": qr.svg(payload),
        },
        status=201,
    )


async def get_readings(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    after = ctx.query["received_after"]
    async with _pool(ctx).connection() as conn:
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
    async with _pool(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        rows = await views.rollups(conn, pid, since, metrics=None if metric is None else [metric])
    return web.json_response(
        {
            "participant_id": pid,
            "from": _t(since),
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


async def list_consent_documents(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with _pool(ctx).connection() as conn:
        study_id, _site = await require_participant(ctx.user, pid, conn)
        docs = await views.consent_documents_in_effect(conn, study_id)
        deadlines = await views.reconsent_deadlines(conn, study_id)
        witness = await views.consent_witness_required(conn, study_id)
        await conn.commit()
        now = datetime.now(UTC)
        async with conn.transaction():
            state = (await records.snapshot(conn, [pid])).state_at(pid, to_ms(now))
            signed_doc = None
            if state is not None and state.consent_id is not None:
                signed_doc = await views.consent_document_of(conn, state.consent_id)
    out = []
    for d in docs:
        signed = signed_doc == d.document_id
        # Re-consent: the consent in force is on an older version of this document and a
        # version up to this one set a deadline (the earliest such deadline applies).
        due = None
        if state is not None and state.document == records.document_key(study_id, d.title):
            by = [
                x.reconsent_by
                for x in deadlines
                if x.title == d.title and state.rank < x.rank <= d.rank
            ]
            due = min(by) if by else None
        out.append(
            {
                "document_id": d.document_id,
                "title": d.title,
                "version": d.version,
                "language": d.language,
                "text": d.text,
                "uri": d.uri,
                "sha256": d.sha256.hex(),
                "scopes": list(d.scopes),
                "optional_scopes": list(d.optional_scopes),
                "effective_at": _t(d.effective_at),
                "signed": signed,
                "signed_scopes": sorted(state.scopes) if signed and state is not None else [],
                "reconsent_by": _t(due),
                "overdue": due is not None and due <= now,
            }
        )
    in_force = None
    if state is not None and state.consent_id is not None and signed_doc is not None:
        in_force = {
            "consent_id": state.consent_id,
            "document_id": signed_doc,
            "scopes": sorted(state.scopes),
        }
    return web.json_response(
        {
            "participant_id": pid,
            "witness_required": witness,
            "in_force": in_force,
            "documents": out,
        }
    )


_CONSENT_ERRORS: dict[type[consent_errors.ConsentError], tuple[type[WebError], str]] = {
    consent_errors.ReauthenticationFailed: (Forbidden, "reauthentication-failed"),
    consent_errors.AlreadySigned: (Conflict, "already-signed"),
    consent_errors.UnknownVersion: (BadInput, "unknown-version"),
    consent_errors.VersionNotEffective: (BadInput, "version-not-effective"),
    consent_errors.SupersededVersion: (BadInput, "superseded-version"),
    consent_errors.InvalidScopes: (BadInput, "invalid-scopes"),
    consent_errors.WitnessRequired: (BadInput, "witness-required"),
    consent_errors.NotPermitted: (NotFound, "not-found"),
    consent_errors.UnknownParticipant: (NotFound, "not-found"),
    consent_errors.IncompleteWithdrawal: (BadInput, "incomplete-withdrawal"),
    consent_errors.ScopeNotGranted: (BadInput, "scope-not-granted"),
    consent_errors.NotConsented: (Conflict, "not-consented"),
}


def _consent_refusal(exc: consent_errors.ConsentError) -> WebError:
    """The HTTP answer to a refused consent act (a type not mapped is a fault: re-raised)."""
    for kind, (error, name) in _CONSENT_ERRORS.items():
        if isinstance(exc, kind):
            err = error(str(exc))
            err.kind = name
            return err
    raise exc


T = TypeVar("T")


async def _consent_act(ctx: Ctx, act: Callable[[Any, records.Actor], Awaitable[T]]) -> T:
    """A signed consent act on the path's participant (signing, withdrawing): rate limited
    per account, the participant checked within the user's sites, refusals as problems."""
    check_request(ctx.request, lambda limits: limits.consent_per_account, ctx.user.username)
    async with _pool(ctx).connection() as conn:
        await require_participant(ctx.user, ctx.path["participant_id"], conn)
        await conn.commit()
        try:
            return await act(conn, _actor(ctx.user))
        except consent_errors.ConsentError as exc:
            raise _consent_refusal(exc) from exc


async def sign_consent(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    rec = await _consent_act(
        ctx,
        lambda conn, actor: records.sign(
            conn,
            actor,
            participant_id=ctx.path["participant_id"],
            document_id=b["document_id"],
            scopes=b["scopes"],
            printed_name=b["printed_name"],
            username=b["username"],
            password=b["password"],
            witness=b["witness"],
        ),
    )
    return web.json_response(
        {
            "consent_id": rec.consent_id,
            "version": rec.version,
            "scopes": sorted(rec.scopes),
            "effective_at": _t(rec.valid_from),
        },
        status=201,
    )


async def withdraw_consent(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    received = records.ReceivedVia(b["received_via"]) if b["received_via"] else None
    w = await _consent_act(
        ctx,
        lambda conn, actor: records.withdraw(
            conn,
            actor,
            participant_id=ctx.path["participant_id"],
            initiated_by=records.Initiator(b["initiated_by"]),
            signature=records.WithdrawalSignature(b["username"], b["password"], received),
            scopes=b["scopes"],
            reason=b["reason"],
        ),
    )
    return web.json_response(
        {
            "consent_id": w.consent_id,
            "participant_id": w.participant_id,
            "scopes": sorted(w.scopes),
            "full": w.full,
            "data_policy": w.data_policy,
            "readings_deleted": w.readings_deleted,
            "effective_at": _t(w.effective_at),
        },
        status=201,
    )


# --- handlers: alerts -----------------------------------------------------------------------


async def _alert_sites(ctx: Ctx, conn: Any, site: str | None) -> list[str]:
    sites = await visible_sites(conn, ctx.user)
    if site is None:
        return sites
    if site not in sites:
        raise NotFound(f"no site {site!r}")
    return [site]


async def list_alerts(ctx: Ctx) -> web.StreamResponse:
    state = ctx.query["state"]
    states = ["open", "acknowledged"] if state == "unresolved" else [state]
    async with _pool(ctx).connection() as conn:
        sites = await _alert_sites(ctx, conn, ctx.query["site"])
        await conn.commit()
        async with conn.transaction():
            # One snapshot for the list and the feed position: a page that then follows the
            # feed from last_event_id misses nothing and sees nothing twice.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = await views.alerts(conn, sites, severity=ctx.query["severity"], states=states)
            last = await views.last_alert_event_id(conn)
    return web.json_response({"alerts": [alert_json(a) for a in rows], "last_event_id": last})


async def _visible_alert(ctx: Ctx, conn: Any, alert_id: int) -> alert_store.Alert:
    sites = await visible_sites(conn, ctx.user)
    found = await views.alerts(conn, sites, alert_ids=[alert_id])
    if not found:
        raise NotFound(f"no alert {alert_id}")
    return found[0]


async def get_alert(ctx: Ctx) -> web.StreamResponse:
    alert_id = ctx.path["alert_id"]
    async with _pool(ctx).connection() as conn:
        alert = await _visible_alert(ctx, conn, alert_id)
        history = await views.alert_history(conn, alert_id)
    return web.json_response(
        {"alert": alert_json(alert), "events": [event_json(e) for e in history]}
    )


async def _transition(ctx: Ctx, *, acknowledge: bool) -> web.StreamResponse:
    alert_id = ctx.path["alert_id"]
    async with _pool(ctx).connection() as conn:
        await _visible_alert(ctx, conn, alert_id)
        await conn.commit()
        change = alert_store.acknowledge if acknowledge else alert_store.resolve
        try:
            await change(conn, alert_id, by=ctx.user.username, note=ctx.body["note"])
        except alert_store.AlertTransitionError as exc:
            raise Conflict(str(exc)) from exc
        except alert_store.AlertNotFound as exc:
            raise NotFound(str(exc)) from exc
        alert = await _visible_alert(ctx, conn, alert_id)
    return web.json_response(alert_json(alert))


async def acknowledge_alert(ctx: Ctx) -> web.StreamResponse:
    return await _transition(ctx, acknowledge=True)


async def resolve_alert(ctx: Ctx) -> web.StreamResponse:
    return await _transition(ctx, acknowledge=False)


# --- handlers: exports ----------------------------------------------------------------------


def _when(name: str, raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise BadInput(f"{name!r} is not a date and time", field=name) from exc
    if t.tzinfo is None:
        raise BadInput(f"{name!r} needs a time zone", field=name)
    return t


def job_json(job: jobs.ExportJob) -> dict[str, Any]:
    r = job.request
    return {
        "job_id": job.job_id,
        "kind": r.kind.value,
        "study_id": r.study_id,
        "participant_id": r.participant_id,
        "from": _t(r.from_time),
        "to": _t(r.to_time),
        "requested_by": job.requested_by,
        "state": job.state.value,
        "submitted_at": _t(job.submitted_at),
        "started_at": _t(job.started_at),
        "finished_at": _t(job.finished_at),
        "rows_written": job.rows_written,
        "error": job.error,
        "files": [
            {
                "index": i,
                "path": f.path,
                "sha256": f.sha256,
                "bytes": f.bytes,
                "rows": f.rows,
                "href": f"{V1}/exports/{job.job_id}/files/{i}",
            }
            for i, f in enumerate(job.files)
        ],
    }


async def submit_export(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    request = ExportRequest(
        ExportKind(b["kind"]),
        b["study_id"],
        b["participant_id"],
        _when("from", b["from"]),
        _when("to", b["to"]),
    )
    if request.from_time and request.to_time and request.from_time >= request.to_time:
        raise BadInput("'from' must be before 'to'", field="to")
    async with _pool(ctx).connection() as conn:
        try:
            job = await jobs.submit(conn, _actor(ctx.user), request)
        except export_errors.InvalidExportRequest as exc:
            raise BadInput(str(exc)) from exc
        except (
            export_errors.UnknownStudy,
            export_errors.UnknownParticipant,
            export_errors.ExportNotPermitted,
        ) as exc:
            # One answer whatever the cause (the audit record keeps it): a participant of
            # another site must not be told apart from one that does not exist.
            who = f", participant {request.participant_id!r}" if request.participant_id else ""
            raise NotFound(
                f"nothing to export for study {request.study_id!r}{who} within your sites"
            ) from exc
    runner = ctx.request.app.get(EXPORT_RUNNER)
    if runner is not None:
        runner.wake()
    return web.json_response(
        job_json(job), status=202, headers={"Location": f"{V1}/exports/{job.job_id}"}
    )


async def _visible_job(ctx: Ctx, conn: Any, job_id: str) -> jobs.ExportJob:
    try:
        return await jobs.status(conn, _actor(ctx.user), job_id)
    except export_errors.JobNotFound as exc:
        raise NotFound(str(exc)) from exc


async def get_export(ctx: Ctx) -> web.StreamResponse:
    async with _pool(ctx).connection() as conn:
        job = await _visible_job(ctx, conn, ctx.path["job_id"])
    return web.json_response(job_json(job))


async def download_export_file(ctx: Ctx) -> web.StreamResponse:
    job_id, index = ctx.path["job_id"], ctx.path["index"]
    actor = _actor(ctx.user)
    async with _pool(ctx).connection() as conn:
        job = await _visible_job(ctx, conn, job_id)
        if job.state is not jobs.JobState.DONE:
            raise Conflict(f"export job {job_id} is {job.state.value}, not done")
        if index >= len(job.files):
            raise NotFound(f"export job {job_id} has no file {index}")
        file = job.files[index]
        # The files hold what the requester could export when the job ran: they are handed
        # out only while the requester may still export that request.
        try:
            async with conn.transaction():
                await export_participants(conn, actor, job.request)
        except export_errors.ExportError as exc:
            raise NotFound(f"no export job {job_id!r}") from exc
        path = ctx.request.app[EXPORT_RUNNER].file_path(job_id, file)
        if path is None:
            raise NotFound(f"file {index} of export job {job_id} is not on this gateway's disk")
        detail: dict[str, object] = {"job_id": job_id, "path": file.path, "sha256": file.sha256}
        if job.request.participant_id is not None:
            detail["participant_id"] = job.request.participant_id
        async with conn.transaction():
            await audit.append(
                conn,
                actor=ctx.user.username,
                action="export.downloaded",
                entity="study",
                entity_id=job.request.study_id,
                detail=detail,
            )
    digest = base64.b64encode(bytes.fromhex(file.sha256)).decode()
    name = file.path.rsplit("/", 1)[-1]
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{name}"',
            "Repr-Digest": f"sha-256=:{digest}:",
            "X-Content-SHA256": file.sha256,
            "Cache-Control": "no-store",
        },
    )


# --- handlers: users ------------------------------------------------------------------------


async def create_user(ctx: Ctx) -> web.StreamResponse:
    b = ctx.body
    async with _pool(ctx).connection() as conn:
        try:
            user = await users.create_user(
                conn,
                actor=ctx.user.username,
                username=b["username"],
                display_name=b["display_name"],
                role=users.Role(b["role"]),
                password=b["password"],
                participant_id=b["participant_id"],
                sites=b["sites"] or (),
            )
        except users.DuplicateUser as exc:
            raise Conflict(str(exc)) from exc
        except users.InvalidUser as exc:
            raise BadInput(str(exc)) from exc
    return web.json_response(auth.user_json(user), status=201)


async def list_users(ctx: Ctx) -> web.StreamResponse:
    async with _pool(ctx).connection() as conn:
        rows = await views.user_list(conn)
    return web.json_response(
        {
            "users": [
                {
                    "username": u.username,
                    "display_name": u.display_name,
                    "role": u.role,
                    "participant_id": u.participant_id,
                    "sites": list(u.sites),
                    "locked": u.locked,
                    "disabled": u.disabled,
                    "created_at": _t(u.created_at),
                }
                for u in rows
            ]
        }
    )


async def get_openapi(ctx: Ctx) -> web.StreamResponse:
    return web.json_response(openapi_document(ENDPOINTS))


# --- the operations -----------------------------------------------------------------------

V1 = "/api/v1"
SITE_ID = Field("site_id", pattern=ID_PATTERN, max_len=64)
PARTICIPANT_ID = Field("participant_id", pattern=ID_PATTERN, max_len=64)
ALERT_ID = Field("alert_id", kind="integer", minimum=1, maximum=2**62)
NOTE = (Field("note", required=False, max_len=500, description="why, in a few words"),)
JOB_ID = Field("job_id", pattern=UUID_PATTERN, max_len=36, min_len=36)
FILE_INDEX = Field("index", kind="integer", minimum=0, maximum=1_000_000)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        f"{V1}/session",
        "login",
        "Sign in",
        login,
        None,
        "session",
        body=(Field("username", max_len=128), Field("password", max_len=1024)),
        ok_schema={**SESSION, "properties": {**SESSION["properties"], "expires_at": TIME}},
        description="Checks the password (lockout after repeated failures) and sets the "
        "session cookie.",
        extra_statuses=(429,),
    ),
    Endpoint(
        "GET",
        f"{V1}/session",
        "get_session",
        "Show the session",
        get_session,
        EVERYONE,
        "session",
        ok_schema=SESSION,
    ),
    Endpoint(
        "DELETE",
        f"{V1}/session",
        "logout",
        "Sign out",
        logout,
        EVERYONE,
        "session",
        ok_status=204,
        ok_content_type="none",
    ),
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
        body=(Field("participant_id", pattern=ID_PATTERN, max_len=64),),
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
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/consent-documents",
        "list_consent_documents",
        "List consent documents to sign",
        list_consent_documents,
        EVERYONE,
        "participants",
        path_params=(PARTICIPANT_ID,),
        ok_schema=CONSENT_DOCUMENTS,
        description="The consent document versions in effect for the participant's study "
        "(the newest version of each document, in each language): text or uri, scopes and "
        "optional scopes, whether the consent in force is on that version, and the "
        "re-consent deadline when the consent in force is on an older version.",
    ),
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/consents",
        "sign_consent",
        "Sign consent",
        sign_consent,
        frozenset({users.Role.PARTICIPANT, users.Role.SITE_COORDINATOR, users.Role.ADMIN}),
        "participants",
        path_params=(PARTICIPANT_ID,),
        body=(
            Field("document_id", kind="integer", minimum=1, maximum=2**62),
            Field("scopes", kind="array", max_len=64),
            Field("printed_name", max_len=200),
            Field("username", max_len=128),
            Field("password", max_len=1024),
            Field("witness", required=False, max_len=200),
        ),
        ok_status=201,
        ok_schema=obj({"consent_id": INT, "version": STR, "scopes": STRS, "effective_at": TIME}),
        conflicts=True,
        description="The participant's e-signature: re-authenticates with the participant's "
        "own user name and password.",
        extra_statuses=(429,),
    ),
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/withdrawals",
        "withdraw_consent",
        "Withdraw consent",
        withdraw_consent,
        frozenset({users.Role.PARTICIPANT, users.Role.SITE_COORDINATOR, users.Role.ADMIN}),
        "participants",
        path_params=(PARTICIPANT_ID,),
        body=(
            Field("initiated_by", enum=tuple(i.value for i in records.Initiator)),
            Field(
                "received_via",
                required=False,
                enum=tuple(r.value for r in records.ReceivedVia),
                description="staff recording a participant's request: how it came",
            ),
            Field("reason", required=False, max_len=500),
            Field(
                "scopes",
                kind="array",
                required=False,
                max_len=64,
                description="withdraw only these scopes (default: all consent)",
            ),
            Field("username", max_len=128),
            Field("password", max_len=1024),
        ),
        ok_status=201,
        ok_schema=obj(
            {
                "consent_id": INT,
                "participant_id": STR,
                "scopes": STRS,
                "full": BOOL,
                "data_policy": STR,
                "readings_deleted": INT,
                "effective_at": TIME,
            }
        ),
        conflicts=True,
        extra_statuses=(429,),
        description="An e-signed act: whoever records it re-authenticates with their own user "
        "name and password. A participant withdraws for themself; site staff record a "
        "withdrawal for their sites with a reason, and for a participant's request, how it "
        "was received. Data already held follows the study's withdrawal policy.",
    ),
    Endpoint(
        "GET",
        f"{V1}/alerts",
        "list_alerts",
        "List alerts",
        list_alerts,
        CLINICAL,
        "alerts",
        query=(
            Field("site", required=False, pattern=ID_PATTERN, max_len=64),
            Field("severity", required=False, enum=SEVERITIES),
            Field("state", required=False, enum=STATES, default="unresolved"),
        ),
        ok_schema=ALERT_LIST,
        extra_statuses=(404,),
        audit_read=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/alerts/events",
        "alert_events",
        "Follow alert events",
        sse.alert_events,
        CLINICAL,
        "alerts",
        ok_content_type="text/event-stream",
        description="Server-sent events, one per alert transition (id: the event id). "
        "Reconnecting with Last-Event-ID (or ?after=) resumes without a gap.",
    ),
    Endpoint(
        "GET",
        f"{V1}/alerts/{{alert_id}}",
        "get_alert",
        "Show an alert",
        get_alert,
        CLINICAL,
        "alerts",
        path_params=(ALERT_ID,),
        ok_schema=ALERT_PAGE,
        audit_read=True,
    ),
    Endpoint(
        "POST",
        f"{V1}/alerts/{{alert_id}}/acknowledge",
        "acknowledge_alert",
        "Acknowledge an alert",
        acknowledge_alert,
        CLINICAL,
        "alerts",
        path_params=(ALERT_ID,),
        body=NOTE,
        ok_schema=ALERT,
        conflicts=True,
    ),
    Endpoint(
        "POST",
        f"{V1}/alerts/{{alert_id}}/resolve",
        "resolve_alert",
        "Resolve an alert",
        resolve_alert,
        CLINICAL,
        "alerts",
        path_params=(ALERT_ID,),
        body=NOTE,
        ok_schema=ALERT,
        conflicts=True,
    ),
    Endpoint(
        "POST",
        f"{V1}/exports",
        "submit_export",
        "Submit an export job",
        submit_export,
        CLINICAL,
        "exports",
        body=(
            Field("kind", enum=tuple(k.value for k in ExportKind)),
            Field("study_id", pattern=ID_PATTERN, max_len=64),
            Field("participant_id", required=False, pattern=ID_PATTERN, max_len=64),
            Field(
                "from",
                required=False,
                pattern=TIME_PATTERN,
                max_len=40,
                description="inclusive, by measurement time, with a time zone",
            ),
            Field(
                "to",
                required=False,
                pattern=TIME_PATTERN,
                max_len=40,
                description="exclusive, by measurement time, with a time zone",
            ),
        ),
        ok_status=202,
        ok_schema=EXPORT_JOB,
        extra_statuses=(404,),
        description="Queues an export of the study (or one participant) for the user's sites; "
        "it runs in the background. Poll the job, then download its files.",
    ),
    Endpoint(
        "GET",
        f"{V1}/exports/{{job_id}}",
        "get_export",
        "Show an export job",
        get_export,
        CLINICAL,
        "exports",
        path_params=(JOB_ID,),
        ok_schema=EXPORT_JOB,
    ),
    Endpoint(
        "GET",
        f"{V1}/exports/{{job_id}}/files/{{index}}",
        "download_export_file",
        "Download a file of an export job",
        download_export_file,
        CLINICAL,
        "exports",
        path_params=(JOB_ID, FILE_INDEX),
        ok_content_type="application/octet-stream",
        conflicts=True,
        description="The file's bytes, streamed from disk; its SHA-256 is in the Repr-Digest "
        "(base64) and X-Content-SHA256 (hex) headers.",
    ),
    Endpoint(
        "GET",
        f"{V1}/users",
        "list_users",
        "List users",
        list_users,
        ADMIN_ONLY,
        "users",
        ok_schema=obj({"users": arr(USER_ROW)}),
    ),
    Endpoint(
        "POST",
        f"{V1}/users",
        "create_user",
        "Create a user",
        create_user,
        ADMIN_ONLY,
        "users",
        body=(
            Field("username", pattern=USERNAME_PATTERN, max_len=64),
            Field("display_name", max_len=200),
            Field("role", enum=tuple(r.value for r in users.Role)),
            Field("password", min_len=users.MIN_PASSWORD_LENGTH, max_len=1024),
            Field("participant_id", required=False, pattern=ID_PATTERN, max_len=64),
            Field("sites", kind="array", required=False, pattern=ID_PATTERN, max_len=64),
        ),
        ok_status=201,
        ok_schema=USER,
        conflicts=True,
    ),
    Endpoint(
        "POST",
        f"{V1}/enrollments",
        "enroll_hub",
        "Enroll a hub",
        get_openapi,
        None,
        "hubs",
        body=(Field("code", max_len=64), Field("csr", max_len=8192)),
        ok_status=201,
        ok_schema=obj(
            {
                "device_id": STR,
                "participant_id": STR,
                "study_id": STR,
                "certificate_pem": STR,
                "ca_pem": STR,
                "receipt_key_pem": STR,
                "broker": obj({"host": STR, "port": INT, "tls": {"type": "boolean"}}),
                "topics": {"type": "object"},
            }
        ),
        extra_statuses=(404, 409, 410, 429),
        routed=False,
        description="A hub redeems a single-use enrollment code and a PEM certificate signing "
        "request for its identity (routed in gateway.app).",
    ),
    Endpoint(
        "GET",
        f"{V1}/openapi.json",
        "get_openapi",
        "This document",
        get_openapi,
        ADMIN_ONLY,
        "meta",
        ok_schema={"type": "object"},
        description="For admins: it maps every operation the gateway offers.",
    ),
)
