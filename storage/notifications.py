"""Alerts delivered to people who are not looking at a page (docs/notifications.md).

1. People say how they are reached (``set_contact``: an e-mail address, a webhook URL with a
   signing secret, and which events: ``escalated``, ``critical``) and sites say who is on call
   when (``add_on_call``). Both audited.
2. ``plan`` follows the alert events (a cursor: event ids commit in increasing order) and, for
   each escalation and each critical alert opened, adds a delivery row per person on call for
   the event's site at its time and channel they asked for it on; an event that reaches no one
   gets one ``no_recipient`` row saying why.
3. The gateway's notifier ``claim``s due deliveries (taking a lease, so a notifier that dies
   mid-send leaves them due again: at least once), sends them, and ``record``s each outcome:
   sent, or failed with the error, retried on ``RETRY_DELAYS_S`` until it is given up.

No reading value is in a delivery row or a message (docs/alerts.md).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final
from urllib.parse import urlsplit

from psycopg.rows import class_row

from ingest.wire import TEXT_CONTROL_RE
from storage import audit
from storage.db import Conn
from storage.errors import StorageError

# Waits after the 1st, 2nd ... failed attempt; after the last, the delivery is given up
# ("failed"): eight attempts over about 80 minutes.
RETRY_DELAYS_S: Final = (30, 60, 120, 300, 600, 1200, 2400)
MAX_ATTEMPTS: Final = len(RETRY_DELAYS_S) + 1
# How long a claimed delivery is someone's: past it, another notifier may take it again.
LEASE_S: Final = 120
PLAN_BATCH: Final = 500
MAX_ERROR: Final = 500
MAX_EMAIL: Final = 254
MAX_URL: Final = 2048
SECRET_BYTES: Final = 32
# A plain address: local part and a domain with a dot (or this machine's mail: localhost),
# no spaces, quotes or controls.
_EMAIL: Final = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
    r"([A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+|localhost)"
)
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


class Event(StrEnum):
    """Which alert events a person asks to be told of."""

    ESCALATED = "escalated"  # an alert left unacknowledged past the escalation time
    CRITICAL = "critical"  # a critical alert opened


class Channel(StrEnum):
    EMAIL = "email"
    WEBHOOK = "webhook"


class State(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    NO_RECIPIENT = "no_recipient"


class NotificationError(StorageError):
    """A contact or on-call assignment that cannot be: the message says why."""


@dataclass(frozen=True, slots=True)
class Contact:
    username: str
    email: str | None
    webhook_url: str | None
    events: list[str]
    updated_by: str
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class OnCall:
    on_call_id: int
    site_id: str
    username: str
    from_time: datetime
    to_time: datetime
    created_by: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery as the board and the command line show it."""

    delivery_id: int
    event_id: int
    alert_id: int
    event: str
    severity: str
    site_id: str
    participant_id: str
    username: str | None
    channel: str | None
    address: str | None
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None

    def as_json(self) -> dict[str, object]:
        """As the API and the command line show it: times in ISO 8601, the user as ``user``."""
        iso = {"next_attempt_at", "created_at", "sent_at"}
        out: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out["user" if name == "username" else name] = (
                value.isoformat() if name in iso and value is not None else value
            )
        return out


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed delivery with what its message says."""

    delivery_id: int
    channel: str
    address: str
    attempts: int
    webhook_secret: bytes | None
    username: str
    display_name: str
    event_id: int
    alert_id: int
    event: str
    at: datetime
    study_id: str
    site_id: str
    participant_id: str
    rule_id: int
    rule_name: str
    severity: str


@dataclass(frozen=True, slots=True)
class Planned:
    events: int
    deliveries: int
    unreached: int


def check_email(email: str) -> str:
    if len(email) > MAX_EMAIL or _EMAIL.fullmatch(email) is None:
        raise NotificationError(f"not an e-mail address: {email[:80]!r}")
    return email


def check_webhook_url(url: str) -> str:
    """An https URL (http only to this machine, for a local paging bridge), no credentials,
    no control characters, at most ``MAX_URL`` characters."""
    if len(url) > MAX_URL or TEXT_CONTROL_RE.search(url) or " " in url:
        raise NotificationError(f"not a usable webhook URL: {url[:80]!r}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        raise NotificationError(f"not a usable webhook URL: {url[:80]!r} ({exc})") from None
    if parts.scheme not in {"https", "http"} or not host:
        raise NotificationError(f"a webhook URL must be https://host/...: {url[:80]!r}")
    if parts.scheme == "http" and host not in _LOOPBACK:
        raise NotificationError("a webhook URL must use https (http only to this machine)")
    if parts.username is not None or parts.password is not None:
        raise NotificationError("a webhook URL may not carry credentials: it signs instead")
    return url


_USER = "SELECT user_id, role, disabled_at FROM users WHERE username = %s"
_UPSERT_CONTACT = """
INSERT INTO notification_contacts (user_id, email, webhook_url, webhook_secret, events,
                                   updated_by)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (user_id) DO UPDATE SET
    email = excluded.email, webhook_url = excluded.webhook_url,
    webhook_secret = excluded.webhook_secret, events = excluded.events,
    updated_by = excluded.updated_by, updated_at = now()
"""
_DROP_CONTACT = "DELETE FROM notification_contacts WHERE user_id = %s"
_CONTACTS = """
SELECT u.username, n.email, n.webhook_url, n.events, n.updated_by, n.updated_at
FROM notification_contacts n JOIN users u USING (user_id)
ORDER BY u.username
"""


async def _user(conn: Conn, username: str) -> tuple[int, str]:
    cur = await conn.execute(_USER, (username,))
    row = await cur.fetchone()
    if row is None:
        raise NotificationError(f"no user {username[:80]!r}")
    if row[2] is not None:
        raise NotificationError(f"user {username!r} is disabled")
    return int(row[0]), str(row[1])


async def set_contact(
    conn: Conn,
    *,
    username: str,
    email: str | None,
    webhook_url: str | None,
    webhook_secret: bytes | None,
    events: Collection[Event],
    actor: str,
) -> None:
    """Set (or, with neither address, remove) how ``username`` is reached. Audited, without
    the secret."""
    if email is not None:
        check_email(email)
    if webhook_url is not None:
        check_webhook_url(webhook_url)
        if webhook_secret is None or len(webhook_secret) != SECRET_BYTES:
            raise NotificationError(f"a webhook needs a {SECRET_BYTES}-byte signing secret")
    else:
        webhook_secret = None
    if not events:
        raise NotificationError("name at least one event: escalated, critical")
    user_id, _ = await _user(conn, username)
    kept = sorted({Event(e).value for e in events})
    async with conn.transaction():
        if email is None and webhook_url is None:
            await conn.execute(_DROP_CONTACT, (user_id,))
        else:
            await conn.execute(
                _UPSERT_CONTACT, (user_id, email, webhook_url, webhook_secret, kept, actor)
            )
        await audit.append(
            conn,
            actor=actor,
            action="notification.contact_set",
            entity="user",
            entity_id=username,
            detail={"email": email, "webhook_url": webhook_url, "events": kept},
        )


async def contacts(conn: Conn) -> list[Contact]:
    async with conn.cursor(row_factory=class_row(Contact)) as cur:
        await cur.execute(_CONTACTS)
        return await cur.fetchall()


_SITE_EXISTS = "SELECT EXISTS (SELECT 1 FROM sites WHERE site_id = %s)"
_HAS_SITE = "SELECT EXISTS (SELECT 1 FROM user_sites WHERE user_id = %s AND site_id = %s)"
_ADD_ON_CALL = """
INSERT INTO on_call (site_id, user_id, from_time, to_time, created_by)
VALUES (%s, %s, %s, %s, %s) RETURNING on_call_id
"""
_REMOVE_ON_CALL = """
UPDATE on_call SET removed_by = %(actor)s, removed_at = now()
WHERE on_call_id = %(id)s AND removed_at IS NULL
  AND (%(sites)s::text[] IS NULL OR site_id = ANY (%(sites)s))
RETURNING site_id
"""
_ON_CALL = """
SELECT o.on_call_id, o.site_id, u.username, o.from_time, o.to_time, o.created_by
FROM on_call o JOIN users u USING (user_id)
WHERE o.removed_at IS NULL AND (%(site)s::text IS NULL OR o.site_id = %(site)s)
  AND o.to_time > %(since)s
ORDER BY o.site_id, o.from_time, o.on_call_id
"""


async def add_on_call(
    conn: Conn,
    *,
    site_id: str,
    username: str,
    from_time: datetime,
    to_time: datetime,
    actor: str,
) -> int:
    """Put ``username`` on call for ``site_id`` from ``from_time`` to ``to_time``. Audited."""
    if to_time <= from_time:
        raise NotificationError("an on-call period must end after it starts")
    if to_time - from_time > timedelta(days=366):
        raise NotificationError("an on-call period is at most a year")
    cur = await conn.execute(_SITE_EXISTS, (site_id,))
    if not (row := await cur.fetchone()) or not row[0]:
        raise NotificationError(f"no site {site_id[:80]!r}")
    user_id, role = await _user(conn, username)
    if role not in {"clinician", "monitor", "site_coordinator", "admin"}:
        raise NotificationError(f"user {username!r} ({role}) cannot be on call")
    cur = await conn.execute(_HAS_SITE, (user_id, site_id))
    if role != "admin" and not ((row := await cur.fetchone()) and row[0]):
        raise NotificationError(f"user {username!r} does not work at site {site_id!r}")
    async with conn.transaction():
        cur = await conn.execute(_ADD_ON_CALL, (site_id, user_id, from_time, to_time, actor))
        row = await cur.fetchone()
        assert row is not None
        on_call_id = int(row[0])
        await audit.append(
            conn,
            actor=actor,
            action="notification.on_call_added",
            entity="site",
            entity_id=site_id,
            detail={
                "on_call_id": on_call_id,
                "user": username,
                "from": from_time.isoformat(),
                "to": to_time.isoformat(),
            },
        )
    return on_call_id


async def remove_on_call(
    conn: Conn, on_call_id: int, *, actor: str, sites: Collection[str] | None = None
) -> None:
    """End an assignment (of one of ``sites``; None: any). Audited."""
    async with conn.transaction():
        cur = await conn.execute(
            _REMOVE_ON_CALL,
            {"actor": actor, "id": on_call_id, "sites": None if sites is None else list(sites)},
        )
        row = await cur.fetchone()
        if row is None:
            at = "" if sites is None else " at your sites"
            raise NotificationError(f"no current on-call assignment {on_call_id}{at}")
        await audit.append(
            conn,
            actor=actor,
            action="notification.on_call_removed",
            entity="site",
            entity_id=str(row[0]),
            detail={"on_call_id": on_call_id},
        )


async def on_call(conn: Conn, site_id: str | None, since: datetime) -> list[OnCall]:
    """The assignments of one site (or all) that end after ``since``."""
    async with conn.cursor(row_factory=class_row(OnCall)) as cur:
        await cur.execute(_ON_CALL, {"site": site_id, "since": since})
        return await cur.fetchall()


_LOCK_CURSOR = "SELECT last_event_id FROM notification_cursor FOR UPDATE"
_PLAN = """
WITH events AS (
    SELECT e.event_id, e.site_id, e.at, e.event, e.severity,
           CASE WHEN e.event = 'escalated' THEN 'escalated'
                WHEN e.event = 'opened' AND e.severity = 'critical' THEN 'critical' END AS kind
    FROM alert_events e
    WHERE e.event_id > %(after)s
    ORDER BY e.event_id
    LIMIT %(limit)s
), targets AS (
    SELECT DISTINCT e.event_id, e.site_id, u.user_id, ch.channel, ch.address
    FROM events e
    JOIN on_call o ON o.site_id = e.site_id AND o.removed_at IS NULL
                  AND o.from_time <= e.at AND e.at < o.to_time
    JOIN users u ON u.user_id = o.user_id AND u.disabled_at IS NULL
    JOIN notification_contacts n ON n.user_id = u.user_id AND e.kind = ANY (n.events)
    CROSS JOIN LATERAL (VALUES ('email', n.email), ('webhook', n.webhook_url))
        AS ch (channel, address)
    WHERE e.kind IS NOT NULL AND ch.address IS NOT NULL
      AND (u.role = 'admin' OR EXISTS (
          SELECT 1 FROM user_sites s WHERE s.user_id = u.user_id AND s.site_id = e.site_id))
), sent AS (
    INSERT INTO notification_deliveries (event_id, site_id, user_id, channel, address, state,
                                         next_attempt_at)
    SELECT event_id, site_id, user_id, channel, address, 'pending', now() FROM targets
    ON CONFLICT DO NOTHING
    RETURNING 1
), unreached AS (
    INSERT INTO notification_deliveries (event_id, site_id, state, last_error)
    SELECT e.event_id, e.site_id, 'no_recipient',
           'nobody on call for the site at the time asked for this event'
    FROM events e
    WHERE e.kind IS NOT NULL AND NOT EXISTS (SELECT 1 FROM targets t WHERE t.event_id = e.event_id)
    ON CONFLICT DO NOTHING
    RETURNING 1
), moved AS (
    UPDATE notification_cursor SET last_event_id = (SELECT max(event_id) FROM events)
    WHERE EXISTS (SELECT 1 FROM events)
    RETURNING 1
)
SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM sent) AS deliveries,
       (SELECT count(*) FROM unreached) AS unreached
"""


async def plan(conn: Conn, *, limit: int = PLAN_BATCH) -> Planned:
    """Add the deliveries of the alert events after the cursor (at most ``limit`` events), in
    a transaction of its own. Several notifiers may call it: the cursor's row lock orders them."""
    async with conn.transaction():
        cur = await conn.execute(_LOCK_CURSOR)
        row = await cur.fetchone()
        assert row is not None, "migration 0023 seeds the cursor"
        async with conn.cursor(row_factory=class_row(Planned)) as c:
            await c.execute(_PLAN, {"after": int(row[0]), "limit": limit})
            planned = await c.fetchone()
    assert planned is not None
    return planned


_CLAIM = """
WITH due AS (
    SELECT delivery_id FROM notification_deliveries
    WHERE state = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at, delivery_id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE notification_deliveries d
    SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => %(lease)s)
    FROM due WHERE d.delivery_id = due.delivery_id
    RETURNING d.*
)
SELECT c.delivery_id, c.channel, c.address, c.attempts, n.webhook_secret, u.username,
       u.display_name, e.event_id, e.alert_id, e.event, e.at, e.study_id, e.site_id,
       e.participant_id, e.rule_id, r.name AS rule_name, e.severity
FROM claimed c
JOIN alert_events e ON e.event_id = c.event_id
JOIN alert_rules r ON r.rule_id = e.rule_id
JOIN users u ON u.user_id = c.user_id
LEFT JOIN notification_contacts n ON n.user_id = c.user_id
ORDER BY c.delivery_id
"""
_SENT = """
UPDATE notification_deliveries
SET state = 'sent', sent_at = now(), next_attempt_at = NULL, last_error = NULL
WHERE delivery_id = %s AND state = 'pending'
"""
_RETRY = """
UPDATE notification_deliveries
SET next_attempt_at = now() + make_interval(secs => %s), last_error = %s
WHERE delivery_id = %s AND state = 'pending'
"""
_GIVE_UP = """
UPDATE notification_deliveries SET state = 'failed', next_attempt_at = NULL, last_error = %s
WHERE delivery_id = %s AND state = 'pending'
"""


async def claim(conn: Conn, *, limit: int = 20, lease_s: int = LEASE_S) -> list[Due]:
    """Take up to ``limit`` due deliveries for ``lease_s`` (one attempt each), committed."""
    async with conn.transaction(), conn.cursor(row_factory=class_row(Due)) as cur:
        await cur.execute(_CLAIM, {"limit": limit, "lease": lease_s})
        return await cur.fetchall()


async def record(conn: Conn, due: Due, *, error: str | None, permanent: bool = False) -> State:
    """What became of one attempt: sent (``error`` None), due again after the next delay, or
    given up (``permanent``, or the last attempt). Returns the delivery's state."""
    if error is None:
        await conn.execute(_SENT, (due.delivery_id,))
        return State.SENT
    said = error[:MAX_ERROR]
    if permanent or due.attempts >= MAX_ATTEMPTS:
        await conn.execute(_GIVE_UP, (said, due.delivery_id))
        return State.FAILED
    await conn.execute(_RETRY, (RETRY_DELAYS_S[due.attempts - 1], said, due.delivery_id))
    return State.PENDING


_DELIVERIES = """
SELECT d.delivery_id, d.event_id, e.alert_id, e.event, e.severity, d.site_id, e.participant_id,
       u.username, d.channel, d.address, d.state, d.attempts, d.next_attempt_at, d.last_error,
       d.created_at, d.sent_at
FROM notification_deliveries d
JOIN alert_events e ON e.event_id = d.event_id
LEFT JOIN users u ON u.user_id = d.user_id
WHERE (%(sites)s::text[] IS NULL OR d.site_id = ANY (%(sites)s))
  AND (%(states)s::text[] IS NULL OR d.state = ANY (%(states)s))
ORDER BY d.delivery_id DESC
LIMIT %(limit)s
"""


async def deliveries(
    conn: Conn,
    *,
    sites: Sequence[str] | None = None,
    states: Sequence[State] | None = None,
    limit: int = 200,
) -> list[Delivery]:
    """The latest deliveries, newest first, of some sites (None: all) and states."""
    async with conn.cursor(row_factory=class_row(Delivery)) as cur:
        await cur.execute(
            _DELIVERIES,
            {
                "sites": None if sites is None else list(sites),
                "states": None if states is None else [s.value for s in states],
                "limit": limit,
            },
        )
        return await cur.fetchall()
