"""The API's adherence operations (docs/adherence.md): a participant's days against the
protocol's schedule, one day's detail with the gaps the hub reported, and a site's cohort
(participants x days, the heat map's cells)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from gateway.web.access import STAFF_AND_ADMIN, require_participant, require_site
from gateway.web.api_common import ID_PATTERN, PARTICIPANT_ID, V1, read_pool_of
from gateway.web.errors import BadInput
from gateway.web.schemas import INT, NULL_INT, NULL_STR, NUM, STR, arr, obj
from gateway.web.spec import Ctx, Endpoint, Field
from storage import adherence

# The longest span one answer covers (a quarter), and the default (the last two weeks).
MAX_DAYS: Final = 92
DEFAULT_DAYS: Final = 14
DATE_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"

NULL_NUM = {"type": "number", "nullable": True}
DATE = {"type": "string", "format": "date"}
METRIC_DAY = obj(
    {
        "metric": STR,
        "kind": NULL_STR,
        "readings": INT,
        "invalid": INT,
        "worn_minutes": INT,
        "study_minutes": NUM,
        "expected_minutes": NULL_NUM,
        "expected_count": NULL_INT,
        "adherence": NULL_NUM,
        "completeness": NULL_NUM,
    }
)
DAY = obj({"day": DATE, "metrics": arr(METRIC_DAY)})
PARTICIPANT_ADHERENCE = obj({"participant_id": STR, "from": DATE, "to": DATE, "days": arr(DAY)})
DAY_DETAIL = obj(
    {
        "participant_id": STR,
        "day": DATE,
        "metrics": arr(METRIC_DAY),
        "gaps": arr(obj({"sensor": NULL_STR, "reason": STR, "minutes": NUM})),
    }
)
COHORT = obj(
    {
        "site_id": STR,
        "from": DATE,
        "to": DATE,
        "participants": arr(
            obj(
                {
                    "participant_id": STR,
                    "days": arr(
                        obj(
                            {
                                "day": DATE,
                                "adherence": NULL_NUM,
                                "metrics_expected": INT,
                                "metrics_met": INT,
                            }
                        )
                    ),
                }
            )
        ),
    }
)


def _date(raw: str | None, name: str) -> date | None:
    if raw is None:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise BadInput(f"{name!r} is not a date (YYYY-MM-DD)", field=name) from None
    if not adherence.FIRST_DAY <= day <= adherence.LAST_DAY:
        raise BadInput(
            f"{name!r} must be from {adherence.FIRST_DAY} to {adherence.LAST_DAY}", field=name
        )
    return day


def span(ctx: Ctx) -> tuple[date, date]:
    """The ``from``..``to`` days asked for (default: the last two weeks, today included)."""
    last = _date(ctx.query["to"], "to") or datetime.now(UTC).date()
    first = _date(ctx.query["from"], "from") or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise BadInput("'from' must not be after 'to'", field="to")
    if (last - first).days >= MAX_DAYS:
        raise BadInput(f"at most {MAX_DAYS} days at once", field="from")
    return first, last


def metric_day_json(m: adherence.MetricDay) -> dict[str, Any]:
    return {
        "metric": m.metric,
        "kind": m.kind,
        "readings": m.readings,
        "invalid": m.invalid,
        "worn_minutes": m.worn_minutes,
        "study_minutes": m.study_minutes,
        "expected_minutes": m.expected_minutes,
        "expected_count": m.expected_count,
        "adherence": m.adherence,
        "completeness": m.completeness,
    }


async def get_adherence(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    first, last = span(ctx)
    async with read_pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        rows = await adherence.days(conn, [pid], first, last)
    by_day: dict[date, list[dict[str, Any]]] = {}
    for r in rows:
        by_day.setdefault(r.day, []).append(metric_day_json(r))
    return web.json_response(
        {
            "participant_id": pid,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "days": [{"day": d.isoformat(), "metrics": ms} for d, ms in sorted(by_day.items())],
        }
    )


async def get_adherence_day(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    day = _date(ctx.path["day"], "day")
    assert day is not None
    async with read_pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        rows = await adherence.days(conn, [pid], day, day)
        gaps = await adherence.gap_minutes(conn, pid, day)
    return web.json_response(
        {
            "participant_id": pid,
            "day": day.isoformat(),
            "metrics": [metric_day_json(r) for r in rows],
            "gaps": [{"sensor": g.sensor, "reason": g.reason, "minutes": g.minutes} for g in gaps],
        }
    )


async def get_site_adherence(ctx: Ctx) -> web.StreamResponse:
    site_id = ctx.path["site_id"]
    first, last = span(ctx)
    async with read_pool_of(ctx).connection() as conn:
        await require_site(ctx.user, site_id, conn)
        people = await adherence.participants_of_site(conn, site_id)
        cells = await adherence.cohort(conn, people, first, last)
    rows: dict[str, list[dict[str, Any]]] = {p: [] for p in people}
    for c in cells:
        rows[c.participant_id].append(
            {
                "day": c.day.isoformat(),
                "adherence": c.adherence,
                "metrics_expected": c.metrics_expected,
                "metrics_met": c.metrics_met,
            }
        )
    return web.json_response(
        {
            "site_id": site_id,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "participants": [{"participant_id": p, "days": d} for p, d in rows.items()],
        }
    )


SPAN = (
    Field(
        "from",
        required=False,
        max_len=10,
        pattern=DATE_PATTERN,
        description=f"first local day (default: {DEFAULT_DAYS - 1} days before 'to')",
    ),
    Field(
        "to",
        required=False,
        max_len=10,
        pattern=DATE_PATTERN,
        description=f"last local day (default: today, UTC); at most {MAX_DAYS} days in all",
    ),
)
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/adherence",
        "get_adherence",
        "Read a participant's adherence by day",
        get_adherence,
        STAFF_AND_ADMIN,
        "adherence",
        path_params=(PARTICIPANT_ID,),
        query=SPAN,
        ok_schema=PARTICIPANT_ADHERENCE,
        audit_read=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/adherence/{{day}}",
        "get_adherence_day",
        "Read one day's adherence and gaps",
        get_adherence_day,
        STAFF_AND_ADMIN,
        "adherence",
        path_params=(PARTICIPANT_ID, Field("day", max_len=10, pattern=DATE_PATTERN)),
        ok_schema=DAY_DETAIL,
        audit_read=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/sites/{{site_id}}/adherence",
        "get_site_adherence",
        "Read a site's adherence (participants x days)",
        get_site_adherence,
        STAFF_AND_ADMIN,
        "adherence",
        path_params=(Field("site_id", pattern=ID_PATTERN, max_len=64),),
        query=SPAN,
        ok_schema=COHORT,
        audit_read=True,
    ),
)
