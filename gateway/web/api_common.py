"""What the API's operations share: the path prefix, the id pattern and parameter, and
the helpers every handler uses."""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from consent import records
from gateway.web import auth
from gateway.web.access import Principal
from gateway.web.spec import Ctx, Field

V1 = "/api/v1"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PARTICIPANT_ID = Field("participant_id", pattern=ID_PATTERN, max_len=64)


def pool_of(ctx: Ctx) -> AsyncConnectionPool:
    return ctx.request.app[auth.POOL_KEY]


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def actor_of(p: Principal) -> records.Actor:
    return records.Actor.of(p.user)
