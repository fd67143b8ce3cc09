"""Alert events to pages as server-sent events, resumable with ``Last-Event-ID``.

One listening connection per gateway process (``AlertFeed``) hears ``NOTIFY
trialstream_alerts`` and wakes every open stream; each stream then reads the feed
(``storage.alerts.alert_events_since``) after the last event id it sent, for the user's
sites only. The id of each SSE message is the event id, so a browser that reconnects sends
``Last-Event-ID`` and gets exactly what it missed: the feed, not the notification, is the
source of truth (a notification lost while the listener reconnects costs at most
``POLL_S`` of delay, never an event).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import psycopg
from aiohttp import web
from psycopg_pool import PoolTimeout

from gateway.web import auth
from gateway.web.access import visible_sites
from gateway.web.errors import BadInput
from storage import alerts as alert_store
from storage import db, sessions, views
from storage.errors import DatabaseUnavailable

if TYPE_CHECKING:
    from gateway.web.spec import Ctx

log = logging.getLogger(__name__)

# A stream reads the feed at least this often even without a notification, and writes a
# comment line so proxies and the browser see the connection alive.
POLL_S = 5.0
# Browsers wait this long before reconnecting a dropped stream.
RETRY_MS = 2000
LISTEN_RETRY_CEILING_S = 10.0
_CONNECTION_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)


class AlertFeed:
    """Wakes waiting streams whenever an alert event is committed."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closing = False

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, within_s: float) -> None:
        if self.closing:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._event.wait()

    def close(self) -> None:
        self.closing = True
        self.wake()

    async def listen(self, database_url: str) -> None:
        """Until cancelled: LISTEN on the alerts channel and wake the streams."""
        delay = 0.1
        while True:
            try:
                async with db.connection(database_url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {alert_store.NOTIFY_CHANNEL}")
                    self.wake()  # anything committed while not listening is read now
                    delay = 0.1
                    async for _ in conn.notifies():
                        self.wake()
            except _CONNECTION_ERRORS as exc:
                log.warning(
                    "alert feed: database unavailable retry_in_s=%.1f error=%s",
                    delay,
                    type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_CEILING_S)


FEED_KEY = web.AppKey("alert_feed", AlertFeed)


async def feed_ctx(app: web.Application, database_url: str) -> AsyncIterator[None]:
    feed = AlertFeed()
    app[FEED_KEY] = feed
    task = asyncio.create_task(feed.listen(database_url), name="web-alert-feed")
    yield
    feed.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def close_streams(app: web.Application) -> None:
    """``on_shutdown``: end every open stream so the server can stop at once."""
    if FEED_KEY in app:
        app[FEED_KEY].close()


def _start_after(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadInput("Last-Event-ID (or after) must be an event id", field="after")
    return int(raw)


def message(event: alert_store.AlertEvent, alert: dict[str, Any] | None) -> bytes:
    data = {
        "event_id": event.event_id,
        "alert_id": event.alert_id,
        "event": event.event,
        "at": event.at.isoformat(),
        "actor": event.actor,
        "site_id": event.site_id,
        "participant_id": event.participant_id,
        "severity": event.severity,
        "alert": alert,
    }
    return f"id: {event.event_id}\nevent: alert\ndata: {json.dumps(data)}\n\n".encode()


async def alert_events(ctx: Ctx) -> web.StreamResponse:
    from gateway.web.api import alert_json

    request = ctx.request
    principal = ctx.user
    last = _start_after(request)
    feed = request.app[FEED_KEY]
    pool = request.app[auth.POOL_KEY]
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    await resp.write(f"retry: {RETRY_MS}\n\n".encode())
    log.info("alert stream opened user=%s after=%d", principal.username, last)
    try:
        while not feed.closing:
            async with pool.connection() as conn:
                if await sessions.lookup(conn, principal.token) is None:
                    await resp.write(b"event: signed-out\ndata: {}\n\n")
                    break
                sites = await visible_sites(conn, principal)
                events = await alert_store.alert_events_since(conn, last, sites)
                ids = {e.alert_id for e in events}
                current = {
                    a.alert_id: alert_json(a)
                    for a in await views.alerts(conn, sites, alert_ids=ids, limit=len(ids))
                }
            for ev in events:
                await resp.write(message(ev, current.get(ev.alert_id)))
                last = ev.event_id
            if len(events) >= alert_store.EVENTS_PAGE:
                continue
            await feed.wait(POLL_S)
            await resp.write(b": alive\n\n")
    except (ConnectionResetError, *_CONNECTION_ERRORS) as exc:
        log.info("alert stream ended user=%s reason=%s", principal.username, type(exc).__name__)
    return resp
