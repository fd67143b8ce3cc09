"""What the API's operations share: the path prefix, the id pattern and parameter, and
the helpers every handler uses."""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from consent import records
from gateway.web import auth
from gateway.web.access import Principal
from gateway.web.errors import BadInput
from gateway.web.spec import Ctx, Field
from ingest.envelope import TIME_ZONE_RE
from storage import timeconv

V1 = "/api/v1"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PARTICIPANT_ID = Field("participant_id", pattern=ID_PATTERN, max_len=64)
# An IANA time zone name, as hubs report them (the database also checks it knows the zone).
TIME_ZONE_PATTERN = f"^{TIME_ZONE_RE.pattern}$"
# An ISO 8601 time with its zone, as the API takes times in bodies and queries.
TIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def pool_of(ctx: Ctx) -> AsyncConnectionPool:
    return ctx.request.app[auth.POOL_KEY]


def read_pool_of(ctx: Ctx) -> AsyncConnectionPool:
    """The pool of read-only data endpoints: the standby's where one is set
    (TRIALSTREAM_READ_DATABASE_URL), else the primary's. Nothing written through it."""
    return ctx.request.app[auth.READ_POOL_KEY]


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def actor_of(p: Principal) -> records.Actor:
    return records.Actor.of(p.user)


def when(name: str, raw: str | None) -> datetime | None:
    """A time field (``TIME_PATTERN``) as a datetime; a value that matches the pattern but
    is not a time (month 13) is refused with the field's name."""
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise BadInput(f"{name!r} is not a date and time", field=name) from exc
    if t.tzinfo is None:
        raise BadInput(f"{name!r} needs a time zone", field=name)
    if not timeconv.year_in_range(t):
        raise BadInput(
            f"{name!r} must be from {timeconv.FIRST_YEAR} to {timeconv.LAST_YEAR}", field=name
        )
    return t
