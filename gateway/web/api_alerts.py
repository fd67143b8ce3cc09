"""The API's alert operations: list, follow, show, acknowledge and resolve; and what was sent
to people on call about them (docs/notifications.md)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.web import sse
from gateway.web.access import CLINICAL, visible_sites
from gateway.web.api_common import ID_PATTERN, V1, iso, pool_of
from gateway.web.errors import Conflict, NotFound
from gateway.web.schemas import ALERT, ALERT_LIST, ALERT_PAGE, DELIVERY_LIST
from gateway.web.spec import Ctx, Endpoint, Field
from ingest.flags import worst
from ingest.metrics import METRICS
from storage import alerts as alert_store
from storage import notifications, views

SEVERITIES = ("info", "warning", "critical")
STATES = ("open", "acknowledged", "resolved", "unresolved")
DELIVERY_STATES = tuple(s.value for s in notifications.State)
MAX_DELIVERIES = 500


def _latest_json(a: views.AlertRow) -> dict[str, Any] | None:
    if a.latest_time is None:
        return None
    flags = a.latest_flags or []
    quality = worst(flags)
    return {
        "time": iso(a.latest_time),
        "value": a.latest_value,
        "unit": a.latest_unit,
        "flags": flags,
        "quality": None if quality is None else quality.value,
    }


def alert_json(a: views.AlertRow) -> dict[str, Any]:
    """An alert with what opened it: the rule's kind, bounds and duration, the value that met
    it and when (``condition_time``), how long the condition had held by then (``held_s``:
    from its episode's first reading; for missing data, the silence), and the participant's
    latest reading of the metric (``latest``, null without a recent one)."""
    metric = METRICS.get(a.metric)
    held = None if a.condition_time is None else a.condition_time - a.first_time
    return {
        "alert_id": a.alert_id,
        "rule": a.rule_name,
        "metric": a.metric,
        "study_id": a.study_id,
        "site_id": a.site_id,
        "participant_id": a.participant_id,
        "state": a.state,
        "severity": a.severity,
        "opened_at": iso(a.opened_at),
        "first_time": iso(a.first_time),
        "acknowledged_at": iso(a.acknowledged_at),
        "acknowledged_by": a.acknowledged_by,
        "ack_note": a.ack_note,
        "resolved_at": iso(a.resolved_at),
        "resolved_by": a.resolved_by,
        "escalated_at": iso(a.escalated_at),
        "kind": a.kind,
        "low": a.low,
        "high": a.high,
        "sustained_s": a.sustained_s,
        "value": a.value,
        "unit": None if metric is None else metric.unit,
        "condition_time": iso(a.condition_time),
        "held_s": None if held is None else held.total_seconds(),
        "cleared_time": iso(a.cleared_time),
        "latest": _latest_json(a),
    }


def event_json(e: alert_store.AlertEvent) -> dict[str, Any]:
    return {
        "event_id": e.event_id,
        "event": e.event,
        "at": iso(e.at),
        "actor": e.actor,
        "detail": dict(e.detail),
    }


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
    async with pool_of(ctx).connection() as conn:
        sites = await _alert_sites(ctx, conn, ctx.query["site"])
        await conn.commit()
        async with conn.transaction():
            # One snapshot for the list and the feed position: a page that then follows the
            # feed from last_event_id misses nothing and sees nothing twice.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = await views.alerts(conn, sites, severity=ctx.query["severity"], states=states)
            last = await views.last_alert_event_id(conn)
    return web.json_response({"alerts": [alert_json(a) for a in rows], "last_event_id": last})


async def _visible_alert(ctx: Ctx, conn: Any, alert_id: int) -> views.AlertRow:
    sites = await visible_sites(conn, ctx.user)
    found = await views.alerts(conn, sites, alert_ids=[alert_id])
    if not found:
        raise NotFound(f"no alert {alert_id}")
    return found[0]


async def get_alert(ctx: Ctx) -> web.StreamResponse:
    alert_id = ctx.path["alert_id"]
    async with pool_of(ctx).connection() as conn:
        alert = await _visible_alert(ctx, conn, alert_id)
        history = await views.alert_history(conn, alert_id)
    return web.json_response(
        {"alert": alert_json(alert), "events": [event_json(e) for e in history]}
    )


async def _transition(ctx: Ctx, *, acknowledge: bool) -> web.StreamResponse:
    alert_id = ctx.path["alert_id"]
    async with pool_of(ctx).connection() as conn:
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


# --- handlers: deliveries ------------------------------------------------------------------


async def list_deliveries(ctx: Ctx) -> web.StreamResponse:
    state = ctx.query["state"]
    async with pool_of(ctx).connection() as conn:
        sites = await _alert_sites(ctx, conn, ctx.query["site"])
        rows = await notifications.deliveries(
            conn,
            sites=sites,
            states=None if state is None else [notifications.State(state)],
            limit=ctx.query["limit"],
        )
    return web.json_response({"deliveries": [d.as_json() for d in rows]})


# --- the operations -----------------------------------------------------------------------

ALERT_ID = Field("alert_id", kind="integer", minimum=1, maximum=2**62)
NOTE = (Field("note", required=False, max_len=500, description="why, in a few words"),)

ENDPOINTS: tuple[Endpoint, ...] = (
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
        f"{V1}/alerts/deliveries",
        "list_alert_deliveries",
        "List alert deliveries",
        list_deliveries,
        CLINICAL,
        "alerts",
        query=(
            Field("site", required=False, pattern=ID_PATTERN, max_len=64),
            Field("state", required=False, enum=DELIVERY_STATES),
            Field(
                "limit",
                kind="integer",
                required=False,
                minimum=1,
                maximum=MAX_DELIVERIES,
                default=50,
            ),
        ),
        ok_schema=DELIVERY_LIST,
        extra_statuses=(404,),
        audit_read=True,
        description="The e-mails and webhooks sent about alerts to people on call, newest "
        "first: each with its state (pending, sent, failed, no_recipient), attempts and last "
        "error.",
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
)
