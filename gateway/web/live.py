"""A participant's readings pushed to a clinician's live view as server-sent events.

``GET /api/v1/participants/{participant_id}/readings/live?minutes=N`` first sends the window
whole (``event: window``: the readings measured in the last N minutes and the gaps the hubs
reported), then (``event: readings``) what the gateway stores for that participant as it
arrives, and the window whole again every ``FULL_EVERY_S``, which also brings newly reported
gaps and anything an increment could have missed. Both carry the same fields as
``GET .../readings``; a page keys readings by (time, device, sensor) and drops repeats.

Increments come from one :class:`LiveFeed` per gateway process. Every ``TICK_S``, while any
stream is open, one query reads the readings of every watched participant that the gateway
received since the previous read (less ``reading_views.RECEIVED_OVERLAP_MS``:
``received_at`` is stamped before a batch commits) and that were measured at most ``LATE_S``
before it, and each stream is handed those of its participant that it was not handed
before. A hundred open views cost one query per tick, not a hundred requests with their
session, access and window queries each. A reading that reaches the gateway more than
``LATE_S`` after it was measured (a hub catching up after being offline) is in the stream's
next window.

A stream asks for its user as the session says now every ``POLL_S``
(``access.SessionChecks``: one query every ``access.STREAM_CHECK_S`` for all of a process's
open streams) and reads the participant's site again with each whole window: it ends with
``event: signed-out`` when the session ends and ``event: forbidden`` when the user may no
longer see the participant (the user lost the site within seconds; the participant moved to
another site within ``FULL_EVERY_S``). A stream whose client falls ``MAX_PENDING`` readings
behind drops them and is sent the window whole instead, so a slow reader cannot grow the
gateway's memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.web import auth, streams, trail
from gateway.web.access import CLINICAL, require_participant
from ingest.flags import worst
from ingest.metrics import METRICS
from storage import db, reading_views, views
from storage.errors import DatabaseUnavailable
from storage.timeconv import to_ms

if TYPE_CHECKING:
    from gateway.web.spec import Ctx

log = logging.getLogger(__name__)

# The feed reads what is new this often (the live view's former polling interval).
TICK_S = 2.0
# A stream checks its session and access this often, and writes a comment line when idle.
POLL_S = 5.0
# A stream sends its window whole this often.
FULL_EVERY_S = 60.0
# The longest window a live stream serves.
MAX_MINUTES = 60
# A feed read looks for readings measured at most this long before the previous read (and
# within the longest open window): a hub's readings reach the gateway seconds after they are
# measured. Later ones (a hub catching up after being offline) come with the stream's next
# whole window instead, within FULL_EVERY_S; reading every watched participant's whole
# window on every tick is what this spares the database.
LATE_S = 60.0
# Readings one stream may have waiting before it is sent the window whole instead.
MAX_PENDING = 5_000
# Readings one feed read takes; a read that fills it sends every stream its window.
READ_LIMIT = 50_000
RETRY_MS = 2000
RETRY_CEILING_S = 10.0
_CONNECTION_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)

_Key = tuple[datetime, str, str, str]


def reading_json(r: reading_views.ReadingRow) -> dict[str, Any]:
    """One reading as the API answers it, with what its device said about it: ``flags``
    (empty when nothing), ``quality`` (the worst flag's class, or None) and ``device_user``."""
    quality = worst(r.flags)
    return {
        "t": to_ms(r.time),
        "metric": r.metric,
        "value": r.value,
        "unit": r.unit,
        "device_id": r.device_id,
        "sensor": r.sensor,
        "flags": r.flags,
        "quality": None if quality is None else quality.value,
        "device_user": r.device_user,
    }


def gap_json(g: reading_views.GapRow) -> dict[str, Any]:
    return {
        "device_id": g.device_id,
        "from": to_ms(g.from_time),
        "to": to_ms(g.to_time),
        "reason": g.reason,
    }


def _span(pid: str, now: datetime, minutes: int) -> dict[str, Any]:
    return {
        "participant_id": pid,
        "from": (now - timedelta(minutes=minutes)).isoformat(),
        "to": now.isoformat(),
    }


def _key(r: reading_views.ReadingRow) -> _Key:
    return (r.time, r.metric, r.device_id, r.sensor)


async def _window(
    conn: db.Conn,
    pid: str,
    minutes: int,
    *,
    metric: str | None = None,
    received_after: datetime | None = None,
) -> tuple[dict[str, Any], list[reading_views.ReadingRow]]:
    now = datetime.now(UTC)
    since = now - timedelta(minutes=minutes)
    rows = await reading_views.readings_window(
        conn,
        pid,
        since,
        metrics=None if metric is None else [metric],
        received_after=received_after,
    )
    gaps = await reading_views.gaps_window(conn, pid, since)
    body = {
        **_span(pid, now, minutes),
        "cursor": to_ms(now) - reading_views.RECEIVED_OVERLAP_MS,
        "readings": [reading_json(r) for r in rows],
        "gaps": [gap_json(g) for g in gaps],
    }
    return body, rows


async def window(
    conn: db.Conn,
    pid: str,
    minutes: int,
    *,
    metric: str | None = None,
    received_after: datetime | None = None,
) -> dict[str, Any]:
    """The answer of ``GET .../readings`` (and a stream's ``window`` event)."""
    body, _ = await _window(conn, pid, minutes, metric=metric, received_after=received_after)
    return body


@dataclass(eq=False, slots=True)
class Watch:
    """One open stream's share of the feed."""

    participant_id: str
    minutes: int = MAX_MINUTES
    pending: list[reading_views.ReadingRow] = field(default_factory=list)
    behind: bool = False
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def hand(self, row: reading_views.ReadingRow) -> None:
        if self.behind:
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.clear()
            self.behind = True
        else:
            self.pending.append(row)

    def take(self) -> list[reading_views.ReadingRow]:
        rows, self.pending = self.pending, []
        return rows

    def wake(self) -> None:
        self._event.set()

    async def wait(self, within_s: float) -> bool:
        """Whether the feed woke this stream within ``within_s``."""
        try:
            async with asyncio.timeout(within_s):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class LiveFeed:
    """Reads what the gateway has received for every watched participant, once per tick for
    all the process's streams, and hands each stream what it has not been handed yet."""

    def __init__(self, *, tick_s: float | None = None) -> None:
        self.tick_s = TICK_S if tick_s is None else tick_s
        self.closing = False
        self.reads = 0
        self._watches: dict[str, set[Watch]] = {}
        self._seen: dict[str, dict[_Key, datetime]] = {}
        self._after: datetime | None = None
        self._wanted = asyncio.Event()

    @property
    def streams(self) -> int:
        return sum(len(w) for w in self._watches.values())

    def watch(self, participant_id: str, minutes: int = MAX_MINUTES) -> Watch:
        w = Watch(participant_id, minutes)
        self._watches.setdefault(participant_id, set()).add(w)
        self._wanted.set()
        return w

    def unwatch(self, w: Watch) -> None:
        left = self._watches.get(w.participant_id)
        if left is None:
            return
        left.discard(w)
        if not left:
            del self._watches[w.participant_id]
            self._seen.pop(w.participant_id, None)

    async def read(self, conn: db.Conn) -> None:
        """Hand every stream the readings of its participant received since the last read."""
        if not self._watches:
            return
        now = datetime.now(UTC)
        overlap = timedelta(milliseconds=reading_views.RECEIVED_OVERLAP_MS)
        after = self._after if self._after is not None else now - overlap
        widest = max(w.minutes for watches in self._watches.values() for w in watches)
        since = max(now - timedelta(minutes=widest), after - timedelta(seconds=LATE_S))
        rows = await reading_views.readings_received(
            conn, list(self._watches), METRICS, since, after, limit=READ_LIMIT
        )
        self.reads += 1
        self._after = now - overlap
        woken: set[Watch] = set()
        for row in rows:
            watches = self._watches.get(row.participant_id)
            if not watches:
                continue
            seen = self._seen.setdefault(row.participant_id, {})
            key = _key(row)
            if key in seen:
                continue
            seen[key] = row.received_at
            for w in watches:
                w.hand(row)
            woken.update(watches)
        if len(rows) >= READ_LIMIT:
            # More than one read holds: every stream reads its window instead.
            for watches in self._watches.values():
                for w in watches:
                    w.pending.clear()
                    w.behind = True
                    woken.add(w)
        for seen in self._seen.values():
            # What was received before the next read's bound cannot come back.
            for key in [k for k, r in seen.items() if r <= self._after]:
                del seen[key]
        for w in woken:
            w.wake()

    async def run(self, pool: AsyncConnectionPool) -> None:
        """Until cancelled or closed: read once per tick while any stream is open."""
        delay = 0.1
        while not self.closing:
            if not self._watches:
                self._after = None
                self._wanted.clear()
                await self._wanted.wait()
                continue
            started = time.monotonic()
            try:
                async with pool.connection() as conn:
                    await self.read(conn)
                delay = 0.1
            except _CONNECTION_ERRORS as exc:
                # The bound stays where it was: the next read covers the outage.
                log.warning(
                    "live feed: database unavailable retry_in_s=%.1f error=%s",
                    delay,
                    type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CEILING_S)
                continue
            except Exception:
                # Whatever went wrong, the streams must not go quiet for good: try again.
                log.exception("live feed: read failed retry_in_s=%.1f", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CEILING_S)
                continue
            await asyncio.sleep(max(0.0, self.tick_s - (time.monotonic() - started)))

    def close(self) -> None:
        self.closing = True
        self._wanted.set()
        for watches in self._watches.values():
            for w in watches:
                w.wake()


LIVE_KEY = web.AppKey("live_feed", LiveFeed)


def live_ctx(app: web.Application, pool: AsyncConnectionPool) -> AsyncIterator[None]:
    feed = LiveFeed()
    return streams.run_feed(app, LIVE_KEY, feed, lambda: feed.run(pool), "web-live-feed")


def close_streams(app: web.Application) -> None:
    if LIVE_KEY in app:
        app[LIVE_KEY].close()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def live_readings(ctx: Ctx) -> web.StreamResponse:
    request = ctx.request
    principal = ctx.user
    pid = ctx.path["participant_id"]
    minutes = ctx.query["minutes"]
    feed = request.app[LIVE_KEY]
    pool = request.app[auth.POOL_KEY]
    home: tuple[str, str] | None
    async with pool.connection() as conn:
        home = await require_participant(principal, pid, conn)  # 404 before the stream starts
    await trail.record(
        request, principal, trail.READ, "follow_readings", participant_id=pid, query=ctx.query
    )
    resp = await streams.open_stream(request, RETRY_MS)
    log.info("live stream opened user=%s participant=%s", principal.username, pid)
    checks = request.app[auth.SESSION_CHECKS_KEY]
    checks.opened(principal)
    watch = feed.watch(pid, minutes)
    checked_at = time.monotonic()
    warned: datetime | None = None
    full_at = -FULL_EVERY_S
    in_window: set[_Key] = set()
    # After this long, no feed read can return a reading this stream's window held.
    forget_after_s = reading_views.RECEIVED_OVERLAP_MS / 1000 + 2 * feed.tick_s
    try:
        while not feed.closing:
            if time.monotonic() - checked_at >= POLL_S:
                current = await checks.current(pool, principal)
                if current is None:
                    await resp.write(_event("signed-out", {}))
                    break
                principal = current
                warned = await streams.warn_before_idle_end(resp, principal, warned)
                checked_at = time.monotonic()
            full = watch.behind or time.monotonic() - full_at >= FULL_EVERY_S
            if full and full_at >= 0:
                # The participant's site, read again with each whole window.
                async with pool.connection() as conn:
                    home = await views.participant_home(conn, pid)
            if (
                principal.role not in CLINICAL
                or home is None
                or not principal.covers_participant(pid, home[1])
            ):
                await resp.write(_event("forbidden", {"participant_id": pid}))
                break
            if full:
                watch.take()
                watch.behind = False
                async with pool.connection() as conn:
                    body, rows = await _window(conn, pid, minutes)
                await resp.write(_event("window", body))
                full_at = time.monotonic()
                # The feed's next reads overlap what this window holds: not sent twice.
                in_window = {_key(r) for r in rows}
            else:
                rows = watch.take()
                if in_window and time.monotonic() - full_at > forget_after_s:
                    in_window = set()
                if in_window:
                    rows = [r for r in rows if _key(r) not in in_window]
                if rows:
                    body = {
                        **_span(pid, datetime.now(UTC), minutes),
                        "readings": [reading_json(r) for r in rows],
                    }
                    await resp.write(_event("readings", body))
            if not await watch.wait(POLL_S) and not feed.closing:
                await resp.write(b": alive\n\n")
    except (ConnectionResetError, *_CONNECTION_ERRORS) as exc:
        log.info("live stream ended user=%s reason=%s", principal.username, type(exc).__name__)
    finally:
        feed.unwatch(watch)
        checks.closed(principal)
    return resp
