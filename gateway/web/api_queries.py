"""The API's data queries (docs/queries.md): a monitor opens a query on a participant's data,
the site answers, the monitor closes or reopens it; open queries are listed per participant
and per site."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from gateway.web.access import STAFF_AND_ADMIN, require_participant, require_site, visible_sites
from gateway.web.api_common import (
    ID_PATTERN,
    PARTICIPANT_ID,
    TIME_PATTERN,
    V1,
    pool_of,
    when,
)
from gateway.web.errors import BadInput, Conflict, NotFound
from gateway.web.schemas import INT, NULL_INT, NULL_STR, STR, TIME, arr, obj
from gateway.web.spec import Ctx, Endpoint, Field
from storage import queries
from storage.db import Conn
from storage.users import Role

# A monitor (or an admin) asks and decides; the site's coordinator or clinician answers.
ASKERS: Final = frozenset({Role.MONITOR, Role.ADMIN})
ANSWERERS: Final = frozenset({Role.SITE_COORDINATOR, Role.CLINICIAN, Role.ADMIN})
UNRESOLVED: Final = ("open", "answered")
STATE_FILTER: Final = ("unresolved", "open", "answered", "closed", "all")

MESSAGE = obj({"action": STR, "text": STR, "actor": STR, "at": TIME})
QUERY = obj(
    {
        "query_id": INT,
        "participant_id": STR,
        "site_id": STR,
        "target": STR,
        "metric": NULL_STR,
        "from": TIME,
        "to": TIME,
        "device_id": NULL_STR,
        "seq": NULL_INT,
        "state": STR,
        "opened_by": STR,
        "opened_at": TIME,
        "updated_at": TIME,
        "messages": arr(MESSAGE),
    }
)
QUERY_LIST = obj({"queries": arr(QUERY)})


query_json = queries.as_json


def _states(raw: str) -> list[str] | None:
    if raw == "all":
        return None
    return list(UNRESOLVED) if raw == "unresolved" else [raw]


async def _answer(conn: Conn, found: list[queries.Query]) -> web.Response:
    said = await queries.messages(conn, [q.query_id for q in found])
    return web.json_response({"queries": [query_json(q, said[q.query_id]) for q in found]})


async def open_query(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    b = ctx.body
    start = when("from", b["from"])
    assert start is not None
    end = when("to", b["to"]) or start
    subject = queries.Subject(
        queries.Target(b["target"]), start, end, b["metric"], b["device_id"], b["seq"]
    )
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        await conn.commit()
        try:
            query_id = await queries.open_query(
                conn, pid, subject, b["text"], actor=ctx.user.username
            )
        except queries.QueryError as exc:
            raise BadInput(str(exc)) from exc
        (found,) = await queries.queries(conn, query_ids=[query_id])
        return await _one(conn, found, status=201)


async def participant_queries(ctx: Ctx) -> web.StreamResponse:
    pid = ctx.path["participant_id"]
    async with pool_of(ctx).connection() as conn:
        await require_participant(ctx.user, pid, conn)
        found = await queries.queries(conn, participant_id=pid, states=_states(ctx.query["state"]))
        return await _answer(conn, found)


async def site_queries(ctx: Ctx) -> web.StreamResponse:
    site_id = ctx.path["site_id"]
    async with pool_of(ctx).connection() as conn:
        await require_site(ctx.user, site_id, conn)
        found = await queries.queries(conn, site_ids=[site_id], states=_states(ctx.query["state"]))
        return await _answer(conn, found)


async def _visible(ctx: Ctx, conn: Conn, query_id: int) -> queries.Query:
    sites = None if ctx.user.site_ids is None else await visible_sites(conn, ctx.user)
    found = await queries.queries(conn, site_ids=sites, query_ids=[query_id])
    if not found:
        raise NotFound(f"no query {query_id}")
    return found[0]


async def _one(conn: Conn, q: queries.Query, status: int = 200) -> web.Response:
    said = await queries.messages(conn, [q.query_id])
    return web.json_response(query_json(q, said[q.query_id]), status=status)


async def get_query(ctx: Ctx) -> web.StreamResponse:
    async with pool_of(ctx).connection() as conn:
        return await _one(conn, await _visible(ctx, conn, ctx.path["query_id"]))


async def _step(ctx: Ctx, action: queries.Step) -> web.StreamResponse:
    query_id = ctx.path["query_id"]
    async with pool_of(ctx).connection() as conn:
        await _visible(ctx, conn, query_id)
        await conn.commit()
        try:
            await queries.step(conn, query_id, action, ctx.body["text"], actor=ctx.user.username)
        except queries.QueryStateError as exc:
            raise Conflict(str(exc)) from exc
        except queries.QueryError as exc:
            raise BadInput(str(exc), field="text") from exc
        return await _one(conn, await _visible(ctx, conn, query_id))


async def answer_query(ctx: Ctx) -> web.StreamResponse:
    return await _step(ctx, queries.Step.ANSWER)


async def close_query(ctx: Ctx) -> web.StreamResponse:
    return await _step(ctx, queries.Step.CLOSE)


async def reopen_query(ctx: Ctx) -> web.StreamResponse:
    return await _step(ctx, queries.Step.REOPEN)


QUERY_ID = Field("query_id", kind="integer", minimum=1, maximum=2**62)
TEXT = Field("text", max_len=queries.MAX_TEXT, description="the question, answer or reason")
STATE = Field("state", required=False, enum=STATE_FILTER, default="unresolved")


def _step_endpoint(
    name: str, summary: str, handler: Any, roles: frozenset[Role], path: str
) -> Endpoint:
    return Endpoint(
        "POST",
        f"{V1}/queries/{{query_id}}/{path}",
        name,
        summary,
        handler,
        roles,
        "queries",
        path_params=(QUERY_ID,),
        body=(TEXT,),
        ok_schema=QUERY,
        conflicts=True,
    )


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        f"{V1}/participants/{{participant_id}}/queries",
        "open_query",
        "Open a query on a participant's data",
        open_query,
        ASKERS,
        "queries",
        path_params=(PARTICIPANT_ID,),
        body=(
            Field("target", enum=tuple(t.value for t in queries.Target)),
            Field("metric", required=False, max_len=64, pattern=r"^[a-z][a-z0-9_]{0,63}$"),
            Field("from", max_len=40, pattern=TIME_PATTERN, description="the reading's time"),
            Field("to", required=False, max_len=40, pattern=TIME_PATTERN),
            Field("device_id", required=False, pattern=ID_PATTERN, max_len=64),
            Field("seq", kind="integer", required=False, minimum=0, maximum=2**63 - 1),
            TEXT,
        ),
        ok_status=201,
        ok_schema=QUERY,
        description="On one reading (`target` reading: metric, from, device_id, seq), a metric "
        "over a time range (`range`: metric, from, to) or a gap the hub reported (`gap`: "
        "device_id, seq, from, to).",
    ),
    Endpoint(
        "GET",
        f"{V1}/participants/{{participant_id}}/queries",
        "list_participant_queries",
        "List a participant's queries",
        participant_queries,
        STAFF_AND_ADMIN,
        "queries",
        path_params=(PARTICIPANT_ID,),
        query=(STATE,),
        ok_schema=QUERY_LIST,
        audit_read=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/sites/{{site_id}}/queries",
        "list_site_queries",
        "List a site's queries",
        site_queries,
        STAFF_AND_ADMIN,
        "queries",
        path_params=(Field("site_id", pattern=ID_PATTERN, max_len=64),),
        query=(STATE,),
        ok_schema=QUERY_LIST,
        audit_read=True,
    ),
    Endpoint(
        "GET",
        f"{V1}/queries/{{query_id}}",
        "get_query",
        "Show a query",
        get_query,
        STAFF_AND_ADMIN,
        "queries",
        path_params=(QUERY_ID,),
        ok_schema=QUERY,
        audit_read=True,
    ),
    _step_endpoint("answer_query", "Answer a query", answer_query, ANSWERERS, "answer"),
    _step_endpoint("close_query", "Close a query", close_query, ASKERS, "close"),
    _step_endpoint("reopen_query", "Reopen a query", reopen_query, ASKERS, "reopen"),
)
