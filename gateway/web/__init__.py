"""The people-facing part of the gateway: sign-in, roles and sites, the versioned JSON API
under ``/api/v1`` with its OpenAPI document, live alert events, and the pages.

``setup_web(app)`` adds it to the gateway's aiohttp application (``gateway.app``): the
routes, the alert feed that wakes live pages, the rollup refresher of plain mode, the
runner of export jobs (``gateway.web.exports``), and the rate limits on sign-in, enrollment
and consent signing (``gateway.web.ratelimit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
from aiohttp import web
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.web import auth, live, pages, sse
from gateway.web.access import SessionChecks
from gateway.web.api import ENDPOINTS
from gateway.web.exports import EXPORT_RUNNER, ExportRunner
from gateway.web.ratelimit import RATE_LIMITER, RateLimiter, rate_limit_middleware
from gateway.web.spec import handler_for
from storage import adherence, db, rollups, sessions
from storage.db import Conn
from storage.errors import DatabaseUnavailable
from storage.migrate import StorageMode

log = logging.getLogger(__name__)

# Hourly rollups lag the readings by at most this much in plain mode (the live view reads
# the last minutes from the readings themselves).
ROLLUP_REFRESH_S = 30.0
# Ended and expired sessions are deleted this often, 30 days after they ended.
SESSION_PURGE_EVERY = 120  # rollup rounds: about an hour
MAINTENANCE_RETRY_CEILING_S = 30.0


async def _maintenance_round(conn: Conn, mode: StorageMode, rounds: int) -> None:
    """One round: each step on its own, so one that fails (a row it cannot handle) is logged
    and tried again next round without holding up the others. A database that cannot be
    reached ends the round for the caller to back off."""
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("rollups", lambda: rollups.refresh_rollups(conn, mode)),
        ("adherence", lambda: adherence.refresh(conn)),
    ]
    if rounds % SESSION_PURGE_EVERY == 0:
        steps.append(("sessions", lambda: _purge_sessions(conn)))
    for name, step in steps:
        try:
            await step()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.error(
                "web maintenance: %s failed, tried again next round error=%s: %s",
                name,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )


async def _purge_sessions(conn: Conn) -> None:
    async with conn.transaction():
        await sessions.purge_expired(conn)


async def _maintenance(pool: AsyncConnectionPool, mode: StorageMode) -> None:
    rounds = 0
    delay = 1.0
    while True:
        try:
            async with pool.connection() as conn:
                await _maintenance_round(conn, mode, rounds)
            rounds += 1
            delay = 1.0
            await asyncio.sleep(ROLLUP_REFRESH_S)
        except (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout) as exc:
            log.warning(
                "web maintenance: database unavailable retry_in_s=%.0f error=%s",
                delay,
                type(exc).__name__,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAINTENANCE_RETRY_CEILING_S)


async def _web(app: web.Application) -> AsyncIterator[None]:
    from gateway.app import MODE, POOL, SETTINGS  # gateway.app imports this package

    pool = app[POOL]
    settings = app[SETTINGS]
    app[auth.POOL_KEY] = pool
    read_pool = pool
    if settings.read_database_url:
        read_pool = await db.open_pool(settings.read_database_url, min_size=1, max_size=4)
    app[auth.READ_POOL_KEY] = read_pool
    app[auth.SESSION_CHECKS_KEY] = SessionChecks()
    feed = sse.feed_ctx(app, settings.require_database_url())
    await anext(feed)
    live_feed = live.live_ctx(app, pool)
    await anext(live_feed)
    runner = ExportRunner(
        settings.require_database_url(),
        settings.data_dir / "exports",
        read_url=settings.read_database_url,
    )
    app[EXPORT_RUNNER] = runner
    tasks = [
        asyncio.create_task(_maintenance(pool, app[MODE]), name="web-maintenance"),
        asyncio.create_task(runner.run(), name="web-export-runner"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ctx in (live_feed, feed):
            with contextlib.suppress(StopAsyncIteration):
                await anext(ctx)
        if read_pool is not pool:
            await read_pool.close()


async def _no_store(request: web.Request, response: web.StreamResponse) -> None:
    """Nothing but the static files may be kept by a browser or a proxy: answers carry
    participants' health data and session state (a shared computer's cache, a proxy's disk)."""
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


async def _close_live_streams(app: web.Application) -> None:
    live.close_streams(app)


def setup_web(app: web.Application) -> None:
    """Add the API, the pages and their background work to the gateway's application."""
    app[RATE_LIMITER] = RateLimiter()
    app.middlewares.append(rate_limit_middleware)
    app.on_response_prepare.append(_no_store)
    app.cleanup_ctx.append(_web)
    app.on_shutdown.append(sse.close_streams)
    app.on_shutdown.append(_close_live_streams)
    for ep in ENDPOINTS:
        if ep.routed:
            app.router.add_route(ep.method, ep.aiohttp_path, handler_for(ep))
    pages.add_routes(app)


__all__ = ["setup_web"]
