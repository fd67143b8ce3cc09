"""What the server-sent event streams (the alert board's and the live views') share: the
head of a stream's response, and the one feed per process that every stream reads from,
run for as long as the application."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from aiohttp import web

from gateway.web.access import Principal

# A stream tells its page this long before its session ends for inactivity, so the person
# watching can stay signed in (watching a stream is not a use of the session).
IDLE_WARNING = timedelta(minutes=2)


class Feed(Protocol):
    def close(self) -> None:
        """Wake every stream reading from the feed, so each ends at once."""


F = TypeVar("F", bound=Feed)


async def open_stream(request: web.Request, retry_ms: int) -> web.StreamResponse:
    """An event stream started: never cached, never held back by a buffering proxy, and the
    client told to reconnect after ``retry_ms``."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    await resp.write(f"retry: {retry_ms}\n\n".encode())
    return resp


async def run_feed(
    app: web.Application,
    key: web.AppKey[F],
    feed: F,
    work: Callable[[], Coroutine[Any, Any, None]],
    name: str,
) -> AsyncIterator[None]:
    """A cleanup context: ``feed`` in ``app[key]``, and ``work`` running as the task ``name``
    until the application stops; then the feed is closed and the task ended."""
    app[key] = feed
    task = asyncio.create_task(work(), name=name)
    yield
    feed.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def warn_before_idle_end(
    resp: web.StreamResponse, principal: Principal, warned: datetime | None
) -> datetime | None:
    """Send ``session-idle`` (with the time the session ends) once per idle expiry, when it
    is within ``IDLE_WARNING``; the expiry warned of."""
    ends = principal.idle_expires_at
    if ends is None or ends == warned or ends - datetime.now(UTC) > IDLE_WARNING:
        return warned
    body = json.dumps({"idle_expires_at": ends.isoformat()})
    await resp.write(f"event: session-idle\ndata: {body}\n\n".encode())
    return ends
