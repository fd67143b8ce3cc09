"""Alert events to pages as server-sent events, resumable with ``Last-Event-ID``.

One listening connection per gateway process (``AlertFeed``) hears ``NOTIFY
trialstream_alerts`` and wakes every open stream. The feed (``storage.alerts.alert_events_since``)
is then read once per process, not once per stream: the first stream to wake reads the
events committed since the last read, with their alerts' current state, into a bounded
in-memory window, and every stream sends from it the events after the last id it sent, of
the user's sites only. A stream that starts (or falls) behind the window reads the database
itself until it has caught up. The id of each SSE message is the event id, so a browser
that reconnects sends ``Last-Event-ID`` and gets exactly what it missed: the feed, not the
notification, is the source of truth (a notification lost while the listener reconnects
costs at most ``POLL_S`` of delay, never an event; event ids are committed in increasing
order, so reading after the last id read misses nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Collection
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.web import auth, streams, trail
from gateway.web.access import visible_sites
from gateway.web.errors import BadInput
from storage import alerts as alert_store
from storage import db, views
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
# Events kept in memory for the streams (a few MB); a stream further behind reads the
# database until it has caught up.
WINDOW_EVENTS = 10_000
_CONNECTION_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)


Sent = tuple[alert_store.AlertEvent, dict[str, Any] | None]


class AlertFeed:
    """Wakes waiting streams whenever an alert event is committed, and holds the latest
    events (with their alerts' state then) for every stream of the process to send."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closing = False
        self._window: deque[Sent] = deque()
        self._start: int | None = None  # the window holds every event after this id
        self._head = 0  # ... up to this one
        self._stale = True
        self._read_at = 0.0
        self._reading = asyncio.Lock()

    def wake(self) -> None:
        self._stale = True
        self._event.set()
        self._event = asyncio.Event()

    async def refresh(self, pool: AsyncConnectionPool) -> None:
        """Read the events committed since the last read into the window, once for all
        streams (also every ``POLL_S`` without a notification)."""
        async with self._reading:
            if not self._stale and time.monotonic() - self._read_at < POLL_S:
                return
            self._stale = False
            self._read_at = time.monotonic()
            async with pool.connection() as conn:
                if self._start is None:
                    self._head = self._start = await views.last_alert_event_id(conn)
                sites = [s.site_id for s in await views.sites(conn, None)]
                while True:
                    batch = await _read(conn, self._head, sites)
                    for sent in batch:
                        self._window.append(sent)
                        self._head = sent[0].event_id
                    while len(self._window) > WINDOW_EVENTS:
                        self._start = self._window.popleft()[0].event_id
                    if len(batch) < alert_store.EVENTS_PAGE:
                        break

    @property
    def head(self) -> int:
        """The newest event id read into the window."""
        return self._head

    def after(self, last: int, sites: Collection[str]) -> list[Sent] | None:
        """The window's events after ``last`` of ``sites``; None when the window does not
        reach back to ``last`` (the caller reads the database)."""
        if self._start is None or last < self._start:
            return None
        if last >= self._head:
            return []
        # Event ids increase along the window, and a stream asks for its newest few: walk
        # back from the end (a stream waking per event costs what is new, not the window).
        out: list[Sent] = []
        for sent in reversed(self._window):
            if sent[0].event_id <= last:
                break
            if sent[0].site_id in sites:
                out.append(sent)
        out.reverse()
        return out

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


def feed_ctx(app: web.Application, database_url: str) -> AsyncIterator[None]:
    feed = AlertFeed()
    return streams.run_feed(
        app, FEED_KEY, feed, lambda: feed.listen(database_url), "web-alert-feed"
    )


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


async def _read(conn: db.Conn, last: int, sites: Collection[str]) -> list[Sent]:
    """Events after ``last`` of ``sites`` from the database, with their alerts' state."""
    from gateway.web.api_alerts import alert_json

    events = await alert_store.alert_events_since(conn, last, sites)
    ids = {e.alert_id for e in events}
    current = {
        a.alert_id: alert_json(a)
        for a in await views.alerts(conn, sites, alert_ids=ids, limit=len(ids))
    }
    return [(e, current.get(e.alert_id)) for e in events]


async def alert_events(ctx: Ctx) -> web.StreamResponse:
    request = ctx.request
    principal = ctx.user
    last = _start_after(request)
    feed = request.app[FEED_KEY]
    pool = request.app[auth.POOL_KEY]
    await trail.record(
        request, principal, trail.READ, "alert_events", participant_id=None, query={"after": last}
    )
    resp = await streams.open_stream(request, RETRY_MS)
    log.info("alert stream opened user=%s after=%d", principal.username, last)
    checks = request.app[auth.SESSION_CHECKS_KEY]
    checks.opened(principal)
    checked_at = -POLL_S
    warned: datetime | None = None
    sites: list[str] = []
    try:
        while not feed.closing:
            if time.monotonic() - checked_at >= POLL_S:
                # The session (ended by signing out or expiry) and the user's sites are
                # checked again every POLL_S, not at every event.
                current = await checks.current(pool, principal)
                if current is None:
                    await resp.write(b"event: signed-out\ndata: {}\n\n")
                    break
                principal = current
                warned = await streams.warn_before_idle_end(resp, principal, warned)
                sites = await visible_sites(pool, principal)
                checked_at = time.monotonic()
            await feed.refresh(pool)
            batch = feed.after(last, sites)
            if batch is None:
                head = feed.head
                async with pool.connection() as conn:
                    batch = await _read(conn, last, sites)
                for ev, alert in batch:
                    await resp.write(message(ev, alert))
                    last = ev.event_id
                if len(batch) >= alert_store.EVENTS_PAGE:
                    continue
                # Everything of these sites up to the window's head was committed before
                # this read, so it was in it: from here on the window serves this stream.
                last = max(last, head)
            else:
                for ev, alert in batch:
                    await resp.write(message(ev, alert))
                    last = ev.event_id
                if batch:
                    continue  # more may have been committed while these were written
            await feed.wait(POLL_S)
            await resp.write(b": alive\n\n")
    except (ConnectionResetError, *_CONNECTION_ERRORS) as exc:
        log.info("alert stream ended user=%s reason=%s", principal.username, type(exc).__name__)
    finally:
        checks.closed(principal)
    return resp
